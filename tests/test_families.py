"""Families: real architecture configs, tiny look-alike pipelines, detection and loading errors.

The tiny pipelines stand in for the real checkpoints in every other test, so the checks
here are about them being faithful: same module tree as the published models, loadable
by the stock Diffusers classes, and able to generate.
"""
from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lokr_diffusion.errors import ConfigError, ModelError
from lokr_diffusion.families import (
    FAMILIES as REGISTRY,
    family_of_adapter_keys,
    family_of_checkpoint_keys,
    family_of_models,
    family_of_pipeline,
    get_family,
    prediction_type_of,
)
from lokr_diffusion.families.clip_tokenizer import write_tiny_tokenizer
from lokr_diffusion.models import load_pipeline

FAMILIES = ["sd15", "sd2", "sdxl"]
PIPELINE_CLASS = {"sd15": StableDiffusionPipeline, "sd2": StableDiffusionPipeline,
                  "sdxl": StableDiffusionXLPipeline}


@pytest.fixture(scope="module")
def meta_models():
    return {f: get_family(f).build_meta() for f in FAMILIES}


@pytest.fixture(scope="module")
def tiny_pipes(tiny_pipeline_paths):
    """Each tiny folder reloaded through the stock class, as a user script would."""
    return {f: PIPELINE_CLASS[f].from_pretrained(str(p)) for f, p in tiny_pipeline_paths.items()}


# Published parameter counts: they pin every width, depth and head setting of the configs.
REAL_COUNTS = {
    "sd15": (859_520_964, [123_060_480], 16, [12]),
    "sd2": (865_910_724, [340_387_840], 16, [23]),
    "sdxl": (2_567_463_684, [123_060_480, 694_659_840], 70, [12, 32]),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_meta_models_match_published_architectures(meta_models, family):
    unet, encoders = meta_models[family]
    n_unet, n_text, n_blocks, n_layers = REAL_COUNTS[family]
    assert unet.device.type == "meta"
    assert sum(p.numel() for p in unet.parameters()) == n_unet
    assert [sum(p.numel() for p in e.parameters()) for e in encoders] == n_text
    assert sum(isinstance(m, BasicTransformerBlock) for m in unet.modules()) == n_blocks
    assert [e.config.num_hidden_layers for e in encoders] == n_layers
    # attn-only preset counts of the format spec: 8 projections per block, 4 per CLIP layer
    n_attn = sum(1 for n, m in unet.named_modules() if re.search(r"\.attn[12]\.(to_[qkv]|to_out\.0)$", n))
    assert n_attn == 8 * n_blocks


def test_text_encoder_classes_and_aliases():
    assert [c for c, _ in get_family("sdxl").real_text_encoder_configs()] == ["CLIPTextModel",
                                                                                "CLIPTextModelWithProjection"]
    assert get_family("sd2").real_text_encoder_configs()[0][1]["hidden_act"] == "gelu"
    assert get_family("sd21") is get_family("sd2-v") is get_family("sd2")
    assert [get_family(a).name for a in ("sd1", "SD15", "sd21", "sd2-v", "sdxl", "XL")] == \
        ["sd1", "sd1", "sd2", "sd2", "sdxl", "sdxl"]
    with pytest.raises(ConfigError, match="sd4"):
        get_family("sd4")


def test_every_family_declares_its_own_evidence():
    """Detection must be unambiguous: each family claims its own pipeline class, checkpoint keys
    and metadata, and no other family claims them too."""
    checkpoint_keys = {"sd1": ["cond_stage_model.transformer.text_model.embeddings.x"],
                       "sd2": ["cond_stage_model.model.ln_final.weight"],
                       "sdxl": ["conditioner.embedders.1.model.ln_final.weight"],
                       "flux": ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight",
                                "guidance_in.in_layer.weight"],
                       "flux-schnell": ["model.diffusion_model.double_blocks.0.img_attn.qkv.weight",
                                        "model.diffusion_model.single_blocks.0.linear1.weight"],
                       "sd35-large": ["model.diffusion_model.joint_blocks.37.x_block.attn.qkv.weight"],
                       "sd35-medium": ["joint_blocks.0.x_block.attn2.qkv.weight"],
                       "flux2": ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight",
                                 "double_stream_modulation_img.lin.weight", "guidance_in.in_layer.weight"],
                       "qwen-image": ["transformer_blocks.0.img_mod.1.weight", "txt_in.weight"],
                       "z-image": ["model.diffusion_model.noise_refiner.0.attention.qkv.weight",
                                   "model.diffusion_model.cap_pad_token"]}
    for family in REGISTRY:
        assert family_of_checkpoint_keys(checkpoint_keys[family.name]) is family
        meta = family.file_metadata()
        assert [f for f in REGISTRY if f.matches_metadata(meta)] == [family]
    assert get_family("sd2").file_metadata("v_prediction")["ss_base_model_version"] == "sd_v2_v"
    assert get_family("sd2").variant("v_prediction") == "sd2-v"
    sd = family_of_adapter_keys(["lora_te_text_model_encoder_layers_0_mlp_fc1"])
    assert [f.name for f in sd.candidates] == ["sd1", "sd2"] and sd.family is None
    xl = family_of_adapter_keys(["lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_te2_x_y"])
    assert xl.family is get_family("sdxl")
    assert (sd.name, xl.name, family_of_adapter_keys(["x_y_z"]).name) == ("sd", "sdxl", None)


def test_file_facts_the_toolbox_warns_about():
    """Only SDXL files must use the ldm UNet names and carry ss_base_model_version for A1111."""
    sd1, sd2, sdxl = (get_family(n) for n in ("sd1", "sd2", "sdxl"))
    diffusers_key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    assert sdxl.misread_denoiser_key(diffusers_key)[0] == "sdxl_diffusers_names"
    assert sdxl.misread_denoiser_key("lycoris_down_blocks_1_attentions_0_proj_in")[0] == "sdxl_diffusers_names"
    assert sdxl.misread_denoiser_key("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k") is None
    assert sd1.misread_denoiser_key(diffusers_key) is None and sd2.misread_denoiser_key(diffusers_key) is None
    assert [f.name for f in REGISTRY if f.needs_base_model_version] == ["sdxl"]
    assert dict(sdxl.text_encoder_widths) == {"te1": 768, "te2": 1280}


def test_transformers5_text_model_levels(meta_models):
    """Export keys rely on this: CLIPTextModel lost `text_model`, WithProjection kept it."""
    te1, te2 = meta_models["sdxl"][1]
    assert isinstance(te1, CLIPTextModel) and isinstance(te2, CLIPTextModelWithProjection)
    assert "encoder.layers.0.self_attn.q_proj" in dict(te1.named_modules())
    assert "text_model.encoder.layers.0.self_attn.q_proj" in dict(te2.named_modules())


def _module_tree(unet) -> dict[str, str]:
    """name -> class, with transformer block indices folded (the tiny models are shallower)."""
    return {re.sub(r"transformer_blocks\.\d+", "transformer_blocks.*", n): type(m).__name__
            for n, m in unet.named_modules()}


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_unet_has_the_real_module_tree(meta_models, tiny_pipes, family):
    real, tiny = meta_models[family][0], tiny_pipes[family].unet
    assert _module_tree(tiny) == _module_tree(real)  # incl. conv_shortcut, proj_in kind
    for key in ("down_block_types", "up_block_types", "layers_per_block", "use_linear_projection",
                "addition_embed_type"):
        assert tiny.config.get(key) == real.config.get(key), key
    proj = tiny.get_submodule("down_blocks.1.attentions.0.proj_in")
    assert isinstance(proj, torch.nn.Conv2d if family == "sd15" else torch.nn.Linear)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_pipeline_generates_64px(tiny_pipes, family):
    pipe = tiny_pipes[family]
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    out = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64,
               generator=gen, output_type="pt").images
    assert out.shape == (1, 3, 64, 64)
    assert torch.isfinite(out).all()
    if family == "sdxl":
        widths = [pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size]
        assert sum(widths) == pipe.unet.config.cross_attention_dim


def test_tiny_pipeline_folder_is_small_and_safetensors(tiny_pipeline_paths):
    for path in tiny_pipeline_paths.values():
        files = [p for p in path.rglob("*") if p.is_file()]
        assert sum(p.stat().st_size for p in files) < 20e6
        assert not [p for p in files if p.suffix == ".bin"]
        assert (path / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_tiny_build_is_deterministic(tmp_path, tiny_sd15_path):
    again = get_family("sd1").build_tiny(tmp_path / "a", seed=0)
    other = get_family("sd15").build_tiny(tmp_path / "b", seed=1)
    name = "unet/diffusion_pytorch_model.safetensors"
    ref, same, diff = (load_file(p / name) for p in (tiny_sd15_path, again, other))
    assert all(torch.equal(ref[k], same[k]) for k in ref)
    assert not torch.equal(ref["conv_in.weight"], diff["conv_in.weight"])


@pytest.mark.parametrize("family,expected", [("sd15", "sd1"), ("sd2", "sd2"), ("sdxl", "sdxl")])
def test_detect_family(meta_models, family, expected):
    unet, encoders = meta_models[family]
    assert family_of_models(unet, encoders).name == expected
    assert family_of_models(unet.config).name == expected
    # no hint beyond the structure
    assert family_of_models(get_family(family).tiny_unet_config()).name == expected
    v = family_of_models(unet, encoders).variant("v_prediction")
    assert v == ("sd2-v" if family == "sd2" else expected)


def test_pipeline_family_of_tiny_pipelines(tiny_pipes):
    assert {f: family_of_pipeline(p).variant(prediction_type_of(p)) for f, p in tiny_pipes.items()} == \
        {"sd15": "sd1", "sd2": "sd2-v", "sdxl": "sdxl"}
    with pytest.raises(ModelError, match="has no unet"):  # nor any other family's denoiser attribute
        family_of_pipeline(SimpleNamespace(text_encoder=tiny_pipes["sd15"].text_encoder))


def test_tokenizer_round_trip(tmp_path, tiny_sd15_path):
    caption = "A photo of a cute dog sitting on the beach at sunset, high quality!"
    for folder in (write_tiny_tokenizer(tmp_path / "tok"), tiny_sd15_path / "tokenizer"):
        tok = CLIPTokenizer.from_pretrained(str(folder))
        ids = tok(caption).input_ids
        assert tok.model_max_length == 77
        assert tok.convert_ids_to_tokens([ids[0], ids[-1]]) == ["<|startoftext|>", "<|endoftext|>"]
        assert max(ids) == ids[-1] == len(tok) - 1  # eos is the highest id, as in real CLIP
        assert len(ids) == 2 + len(caption.split()) + 2  # common words are single tokens
        assert tok.decode(ids, skip_special_tokens=True) == "a photo of a cute dog sitting on the beach at sunset , high quality !"
        assert len(tok("x " * 200, truncation=True, padding="max_length", max_length=77).input_ids) == 77
    tok2 = CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(tmp_path / "tok2", pad_token="!")))
    assert tok2.pad_token == "!" and tok2("cat", padding="max_length", max_length=5).input_ids[-1] == tok2.pad_token_id


def test_load_pipeline_detects_and_overrides(tiny_sd2_path, tiny_sdxl_path):
    pipe = load_pipeline(str(tiny_sdxl_path), torch_dtype="fp32")
    assert isinstance(pipe, StableDiffusionXLPipeline) and family_of_pipeline(pipe).name == "sdxl"
    pipe = load_pipeline(tiny_sd2_path, family="sd21", prediction_type="epsilon")
    assert isinstance(pipe, StableDiffusionPipeline) and pipe.safety_checker is None
    assert family_of_pipeline(pipe).variant(prediction_type_of(pipe)) == "sd2"


def test_load_pipeline_errors(tmp_path, tiny_sd15_path):
    with pytest.raises(ModelError, match=r"missing_dir.*does not exist"):
        load_pipeline(str(tmp_path / "missing_dir"))
    with pytest.raises(ModelError, match=r"model\.safetensors does not exist"):
        load_pipeline(str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelError, match="model_index.json"):
        load_pipeline(str(tmp_path))
    with pytest.raises(ModelError, match="family sdxl was requested"):
        load_pipeline(str(tiny_sd15_path), family="sdxl")
    with pytest.raises(ConfigError, match="prediction_type"):
        load_pipeline(str(tiny_sd15_path), prediction_type="x0")

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}))
    with pytest.raises(ModelError, match=r"broken.*from_pretrained"):
        load_pipeline(str(broken))

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read checkpoint .*garbage"):
        load_pipeline(str(garbage))
    unknown = tmp_path / "unknown.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, str(unknown))
    with pytest.raises(ModelError, match="cannot tell the model family"):
        load_pipeline(str(unknown))
    with pytest.raises(ModelError, match="no-such-owner/no-such-model"):  # hub is offline in tests
        load_pipeline("no-such-owner/no-such-model")


def test_cli_tiny_model(tmp_path):
    from lokr_diffusion.cli import main

    assert main(["tiny-model", "--family", "sd2", "--out", str(tmp_path / "m")]) == 0
    unet = UNet2DConditionModel.from_pretrained(str(tmp_path / "m"), subfolder="unet")
    assert family_of_models(unet).name == "sd2"

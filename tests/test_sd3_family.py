"""SD3.5 Large / Medium: real architectures and preset counts on the meta device, keys, detection,
the tiny offline StableDiffusion3Pipeline, and the conditioning the trainer calls.

The counts here are those of the family docstring (lokr_diffusion/families/sd3.py) and of the
DiT spec (536 Linears, 8.06 B parameters for SD3.5 Large).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from lokr_diffusion import AdapterConfig, create_network, load_network
from lokr_diffusion.families import (
    FLUX_DEV,
    SD35_LARGE,
    SD35_MEDIUM,
    SDXL,
    family_of_adapter,
    family_of_adapter_keys,
    family_of_checkpoint_keys,
    family_of_metadata,
    family_of_models,
    family_of_pipeline,
    family_of_pipeline_class,
    family_of_text_encoders,
    get_family,
)
from lokr_diffusion.families import sd3_names
from lokr_diffusion.fileformat import training_metadata
from lokr_diffusion.loading import build_alias_table
from lokr_diffusion.text import tokenize

from .test_tools_helpers import run_json

TEXT = [123_650_304, 694_659_840, 4_762_310_656]  # CLIP-L with projection, CLIP-G, T5-XXL encoder
# (transformer parameters, Linears in it)
REAL = {"sd35-large": (8_056_627_520, 536), "sd35-medium": (2_243_171_520, 392)}
# modules per preset: (transformer, CLIP-L, CLIP-G, T5)
PRESET_COUNTS = {
    "sd35-large": {"attn-only": (303, 48, 128, 96), "attn-mlp": (453, 72, 192, 168), "full": (536, 72, 192, 168)},
    "sd35-medium": {"attn-only": (243, 48, 128, 96), "attn-mlp": (337, 72, 192, 168), "full": (392, 72, 192, 168)},
}
# the tiny Large: 2 blocks, the last context_pre_only; 2-layer CLIPs and T5
TINY_COUNTS = {"attn-only": (8 + 7, 2 * 4, 2 * 4, 2 * 4), "attn-mlp": (12 + 9, 2 * 6, 2 * 6, 2 * 7)}


@pytest.fixture(scope="module", params=sorted(REAL))
def meta(request):
    return request.param, get_family(request.param).build_meta()


@pytest.fixture(scope="module")
def tiny_pipe(tiny_sd3_path):
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _encoders(pipe):
    return [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]


def _count(network, component):
    return sum(1 for c in network.components.values() if c == component)


def _linears(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


# -- real architectures --------------------------------------------------------------------------
def test_meta_models_match_published_architectures(meta):
    name, (transformer, encoders) = meta
    n_params, n_linear = REAL[name]
    assert transformer.device.type == "meta"
    assert sum(p.numel() for p in transformer.parameters()) == n_params
    assert len(_linears(transformer)) == n_linear
    assert [sum(p.numel() for p in e.parameters()) for e in encoders] == TEXT
    assert [type(e) for e in encoders] == [CLIPTextModelWithProjection, CLIPTextModelWithProjection, T5EncoderModel]
    blocks = transformer.transformer_blocks
    assert [b.context_pre_only for b in blocks] == [False] * (len(blocks) - 1) + [True]
    dual = [i for i, b in enumerate(blocks) if b.attn2 is not None]
    assert (len(blocks), dual) == ((24, list(range(13))) if name == "sd35-medium" else (38, []))
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    assert width == get_family(name).attention_width == (1536 if name == "sd35-medium" else 2432)


def test_preset_counts_on_the_real_architecture(meta):
    name, (transformer, encoders) = meta
    family = get_family(name)
    for preset, expected in PRESET_COUNTS[name].items():
        net = create_network(AdapterConfig(preset=preset, factor=8, dim=4), transformer, encoders, family=family)
        got = tuple(_count(net, c) for c in ("unet", "te1", "te2", "te3"))
        assert got == expected, (name, preset, got)
        net.remove()
    full = family.preset_filter(transformer, "full")
    assert all(full(p) for p in _linears(transformer))  # full: every Linear
    assert not full("pos_embed.proj")  # the patch-embedding conv
    attn_mlp = family.preset_filter(transformer, "attn-mlp")
    assert not any(attn_mlp(p) for p in _linears(transformer) if re.search(r"norm1(_context)?\.linear$", p))


def test_keys_and_aliases(meta):
    name, (transformer, encoders) = meta
    family = get_family(name)
    last = len(transformer.transformer_blocks) - 1
    net = create_network(AdapterConfig(preset="full"), transformer, encoders, family=family)
    keys = set(net.module_keys())
    for k in ["lycoris_transformer_blocks_0_attn_to_q", "lycoris_transformer_blocks_0_attn_to_add_out",
              f"lycoris_transformer_blocks_{last}_attn_add_v_proj", f"lycoris_transformer_blocks_{last}_norm1_context_linear",
              "lycoris_transformer_blocks_0_ff_context_net_0_proj", "lycoris_context_embedder",
              "lycoris_time_text_embed_text_embedder_linear_1", "lycoris_norm_out_linear", "lycoris_proj_out",
              "lora_te1_text_model_encoder_layers_11_self_attn_q_proj", "lora_te2_text_model_encoder_layers_31_mlp_fc2",
              "lora_te3_encoder_block_0_layer_0_SelfAttention_q", "lora_te3_encoder_block_23_layer_1_DenseReluDense_wo"]:
        assert k in keys, k
    assert f"lycoris_transformer_blocks_{last}_attn_to_add_out" not in keys  # context_pre_only
    assert ("lycoris_transformer_blocks_12_attn2_to_q" in keys) is (name == "sd35-medium")
    assert not any(k.startswith(("lora_unet_", "lora_te_", "lora_te3_text_model")) for k in keys)
    net.remove()
    table = build_alias_table(transformer, encoders, family)
    for alias, canonical in [
        ("lora_transformer_transformer_blocks_0_attn_to_q", "lycoris_transformer_blocks_0_attn_to_q"),
        ("transformer.transformer_blocks.3.ff.net.2", "lycoris_transformer_blocks_3_ff_net_2"),
        ("base_model.model.transformer_blocks.0.attn.to_add_out", "lycoris_transformer_blocks_0_attn_to_add_out"),
        ("transformer_blocks.1.norm1.linear", "lycoris_transformer_blocks_1_norm1_linear"),
        ("lora_unet_joint_blocks_5_x_block_attn_proj", "lycoris_transformer_blocks_5_attn_to_out_0"),
        ("diffusion_model.joint_blocks.0.context_block.mlp.fc1", "lycoris_transformer_blocks_0_ff_context_net_0_proj"),
        ("lora_unet_y_embedder_mlp_2", "lycoris_time_text_embed_text_embedder_linear_2"),
        ("diffusion_model.final_layer.linear", "lycoris_proj_out"),
        ("lora_te1_encoder_layers_0_mlp_fc1", "lora_te1_text_model_encoder_layers_0_mlp_fc1"),
        ("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj",
         "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"),
        ("lora_te3_encoder_block_5_layer_0_SelfAttention_o", "lora_te3_encoder_block_5_layer_0_SelfAttention_o"),
    ]:
        assert table[alias][1] == canonical, alias
    assert table["lora_te2_text_projection"][0].path == "text_projection"  # OneTrainer's SD3 key
    # the last block's text modulation has its halves swapped: a fused group, never a 1:1 alias
    assert f"lora_unet_joint_blocks_{last}_context_block_adaLN_modulation_1" not in table
    assert f"lora_unet_joint_blocks_{last}_context_block_adaLN_modulation_1" in family.fused_groups(transformer)
    assert "lora_unet_final_layer_adaLN_modulation_1" in family.fused_groups(transformer)


def test_text_encoder_keys():
    assert SD35_LARGE.text_encoder_key(2, "encoder.block.0.layer.0.SelfAttention.q") == \
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q"
    assert SD35_LARGE.text_encoder_key(1, "text_model.encoder.layers.0.mlp.fc1") == \
        "lora_te2_text_model_encoder_layers_0_mlp_fc1"
    assert SD35_LARGE.default_trained_text_encoders == (0, 1)  # T5-XXL only when a config names it
    assert SD35_LARGE.text_preset_filter(2, None, "attn-only")("encoder.block.3.layer.0.SelfAttention.o")
    assert not SD35_LARGE.text_preset_filter(2, None, "attn-only")("encoder.block.3.layer.1.DenseReluDense.wo")


# -- detection ------------------------------------------------------------------------------------
def test_detect_models_and_pipeline_classes(meta):
    name, (transformer, encoders) = meta
    family = get_family(name)
    assert family_of_models(transformer, encoders) is family
    assert family_of_models(transformer.config) is family
    assert family_of_models(family.tiny_transformer_config()) is family
    sd3_medium_30 = {**SD35_MEDIUM.real_transformer_config(), "dual_attention_layers": [], "qk_norm": None}
    assert family_of_models(sd3_medium_30) is SD35_MEDIUM  # SD3 Medium (3.0): Medium's tree without attn2
    assert family_of_models(FLUX_DEV.real_transformer_config()) is FLUX_DEV
    assert family_of_text_encoders(encoders) is SD35_LARGE  # no denoiser: the names cover both
    assert family_of_text_encoders(encoders[:2]) is SDXL  # two CLIP towers alone: SDXL's, as before
    for cls in ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"):
        assert family_of_pipeline_class(cls) is SD35_LARGE, cls
    for other in ("StableDiffusion3ControlNetPipeline", "StableDiffusionXLPipeline", "FluxPipeline"):
        assert family_of_pipeline_class(other) not in (SD35_LARGE, SD35_MEDIUM), other
    assert get_family("sd3") is get_family("SD3.5") is get_family("sd3.5-large") is SD35_LARGE
    assert get_family("sd3-medium") is get_family("sd3.5_medium") is SD35_MEDIUM


def test_detect_checkpoints_and_metadata():
    large = ["joint_blocks.37.x_block.attn.qkv.weight", "joint_blocks.0.context_block.attn.qkv.weight"]
    medium = ["joint_blocks.23.x_block.attn.qkv.weight", "joint_blocks.0.x_block.attn2.qkv.weight"]
    assert family_of_checkpoint_keys(large) is SD35_LARGE
    assert family_of_checkpoint_keys(["model.diffusion_model." + k for k in large]) is SD35_LARGE
    assert family_of_checkpoint_keys(["model.diffusion_model." + k for k in medium]) is SD35_MEDIUM
    assert family_of_checkpoint_keys(["joint_blocks.23.x_block.attn.qkv.weight"]) is SD35_MEDIUM  # SD3 Medium
    assert family_of_checkpoint_keys(["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"]) \
        is get_family("flux-schnell")
    for family in (SD35_LARGE, SD35_MEDIUM):
        assert family_of_metadata(family.file_metadata()) is family
    for arch, family in [("stable-diffusion-3-5-large/lora", SD35_LARGE), ("stable-diffusion-3-m/lora", SD35_MEDIUM),
                         ("stable-diffusion-v3-medium/lora", SD35_MEDIUM), ("stable-diffusion-3/lora", None),
                         ("stable-diffusion-xl-v1-base/lora", None)]:
        assert family_of_metadata({"modelspec.architecture": arch}) is family, arch
    assert family_of_metadata({"ss_base_model_version": "sd3_large"}) is SD35_LARGE
    assert family_of_metadata({"ss_base_model_version": "sd3_m"}) is SD35_MEDIUM


@pytest.mark.parametrize("key", [
    "lora_unet_joint_blocks_0_x_block_attn_qkv", "diffusion_model.joint_blocks.3.context_block.mlp.fc1",
    "model.diffusion_model.joint_blocks.0.x_block.attn.proj", "lycoris_transformer_blocks_0_attn2_to_q",
    "transformer.transformer_blocks.1.attn2.to_out.0", "base_model.model.transformer_blocks.0.attn.to_q",
    "lora_te3_encoder_block_0_layer_0_SelfAttention_q",
])
def test_adapter_files_are_recognised_as_sd3(key):
    found = family_of_adapter_keys([key])
    assert found.candidates == (SD35_LARGE, SD35_MEDIUM) and not found.allows(FLUX_DEV) and not found.allows(SDXL)
    # Large and Medium share every key but attn2: without it, metadata or a width, the file is either's
    undecided = family_of_adapter([("unet", key, (4, 4))], {"ss_base_model_version": "sd3"})
    if "attn2" in key:
        assert undecided.family is SD35_MEDIUM
    else:
        assert undecided.candidates == (SD35_LARGE, SD35_MEDIUM) and undecided.family is None
        assert (undecided.name, undecided.title) == ("sd3.x", "SD3.5 Large or SD3.5 Medium")
        assert family_of_adapter([("unet", key, (4, 4))], SD35_LARGE.file_metadata()).family is SD35_LARGE
    assert family_of_adapter([("unet", key, (4, 4))], SD35_MEDIUM.file_metadata()).family is SD35_MEDIUM


def test_sd3_files_are_told_from_flux_and_sdxl_files():
    """Shared Diffusers block names plus CLIP-G keys are SD3's (Flux's te2 is T5, SDXL has no DiT
    blocks); CLIP-L + CLIP-G keys alone are SDXL's unless the metadata says SD3."""
    dit = ["lycoris_transformer_blocks_0_attn_to_q", "lora_te1_text_model_encoder_layers_0_mlp_fc1"]
    clip_g = ["lora_te2_text_model_encoder_layers_0_self_attn_q_proj"]
    assert family_of_adapter_keys(dit).candidates == (FLUX_DEV, get_family("flux-schnell"), SD35_LARGE, SD35_MEDIUM)
    assert family_of_adapter_keys(dit + clip_g).candidates == (SD35_LARGE, SD35_MEDIUM)
    assert family_of_adapter_keys(dit, SD35_MEDIUM.file_metadata()).allows(SD35_MEDIUM)
    clips = ["lora_te1_text_model_encoder_layers_0_mlp_fc1"] + clip_g
    assert family_of_adapter_keys(clips).family is SDXL
    assert family_of_adapter_keys(clips, SD35_LARGE.file_metadata()).candidates == (SD35_LARGE, SD35_MEDIUM)
    te_modules = [("te1", clips[0], (3072, 768)), ("te2", clips[1], (1280, 1280))]
    assert family_of_adapter(te_modules, {}).family is SDXL
    assert family_of_adapter(te_modules, SD35_LARGE.file_metadata()).family is SD35_LARGE
    # kohya's fused qkv: in-features are the width (Medium 1536)
    fused = [("unet", "lora_unet_joint_blocks_0_x_block_attn_qkv", (3 * 1536, 1536))]
    assert family_of_adapter(fused, {}).family is SD35_MEDIUM


# -- tiny pipeline --------------------------------------------------------------------------------
def _tree(model) -> dict[str, str]:
    return {re.sub(r"(transformer_blocks|block|layers)\.\d+", r"\1.*", n): type(m).__name__
            for n, m in model.named_modules()}


@pytest.mark.parametrize("name", ["sd35-large", "sd35-medium"])
def test_tiny_pipeline_is_sd3_shaped(name, tiny_sd3_path, tiny_sd3_medium_path):
    path = tiny_sd3_path if name == "sd35-large" else tiny_sd3_medium_path
    pipe = StableDiffusion3Pipeline.from_pretrained(str(path))
    transformer, encoders = get_family(name).build_meta()
    assert _tree(pipe.transformer) == _tree(transformer)
    assert [_tree(e) for e in _encoders(pipe)] == [_tree(e) for e in encoders]
    assert family_of_pipeline(pipe) is get_family(name)
    blocks = pipe.transformer.transformer_blocks
    assert blocks[-1].context_pre_only and (blocks[0].attn2 is not None) is (name == "sd35-medium")
    vae = pipe.vae.config
    assert (vae.latent_channels, vae.scaling_factor, vae.shift_factor) == (16, 1.5305, 0.0609)
    assert pipe.vae_scale_factor == 8 and pipe.transformer.config.patch_size == 2
    assert (pipe.scheduler.config.shift, pipe.scheduler.config.use_dynamic_shifting) == (3.0, False)
    assert isinstance(pipe.tokenizer, CLIPTokenizer) and isinstance(pipe.tokenizer_3, T5TokenizerFast)
    assert pipe.tokenizer_2.pad_token == "!"
    files = [p for p in path.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 20e6 and not [p for p in files if p.suffix == ".bin"]


def test_tiny_pipeline_generates_64px(tiny_pipe):
    out = tiny_pipe("a photo of a cat", num_inference_steps=2, height=64, width=64,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


def test_tiny_build_is_deterministic(tmp_path, tiny_sd3_path):
    from safetensors.torch import load_file

    name = "transformer/diffusion_pytorch_model.safetensors"
    again = load_file(SD35_LARGE.build_tiny(tmp_path / "a", seed=0) / name)
    ref = load_file(tiny_sd3_path / name)
    assert ref.keys() == again.keys() and all(torch.equal(ref[k], again[k]) for k in ref)


def test_adapter_on_the_tiny_pipeline(tiny_pipe, tmp_path):
    parts = _encoders(tiny_pipe)
    for preset, expected in TINY_COUNTS.items():
        net = create_network(AdapterConfig(algo="lokr", preset=preset, factor=4, dim=4), tiny_pipe.transformer, parts)
        assert net.family is SD35_LARGE
        assert tuple(_count(net, c) for c in ("unet", "te1", "te2", "te3")) == expected, preset
        if preset == "attn-mlp":
            with torch.no_grad():
                for p in net.parameters():
                    p.normal_(0, 0.1)
            path = net.save(tmp_path / "sd3.safetensors", dtype=torch.float32)
        net.remove()
    loaded, report = load_network(str(path), tiny_pipe.transformer, parts, strict=True)
    assert report.patched == dict(zip(("unet", "te1", "te2", "te3"), TINY_COUNTS["attn-mlp"]))
    assert not report.unmatched
    loaded.remove()
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-large/lora"
    assert meta["ss_base_model_version"] == "sd3_large" and "modelspec.prediction_type" not in meta


# -- conditioning: what the trainer calls must be what StableDiffusion3Pipeline does ----------------
@pytest.mark.parametrize("caption", ["a red car on a street", "word " * 300])
def test_encode_text_matches_the_pipeline(tiny_pipe, caption):
    """The trainer's token ids (each tokenizer's model_max_length: 77, 77, 512) give the pipeline's
    embeddings (T5 cut to its 256 tokens, ending in </s> when the caption is longer)."""
    ids = tokenize([tiny_pipe.tokenizer, tiny_pipe.tokenizer_2, tiny_pipe.tokenizer_3], [caption])
    assert [i.shape[-1] for i in ids] == [77, 77, 512]
    with torch.no_grad():
        ours = SD35_LARGE.encode_text(_encoders(tiny_pipe), ids, torch.device("cpu"))
        prompt, _, pooled, _ = tiny_pipe.encode_prompt(caption, None, None, device=torch.device("cpu"),
                                                       do_classifier_free_guidance=False)
    assert ours["prompt_embeds"].shape == (1, 77 + 256, 96) and ours["pooled_prompt_embeds"].shape == (1, 64)
    assert torch.equal(ours["prompt_embeds"], prompt) and torch.equal(ours["pooled_prompt_embeds"], pooled)
    assert torch.equal(ours["prompt_embeds"][:, :77, 64:], torch.zeros(1, 77, 32))  # CLIP zero-padded to T5's width


def test_encode_text_needs_t5(tiny_pipe):
    with pytest.raises(ValueError, match="three text encoders"):
        SD35_LARGE.encode_text(_encoders(tiny_pipe)[:2], [torch.zeros(1, 77, dtype=torch.long)] * 2, torch.device("cpu"))


def test_denoise_matches_the_transformer_call(tiny_pipe):
    """4-D latents and 0-1000 timesteps in (the trainer's contract), the transformer called as
    StableDiffusion3Pipeline calls it, 4-D out."""
    transformer = tiny_pipe.transformer
    latents = torch.randn(2, 16, 8, 12)
    embeds = {"prompt_embeds": torch.randn(2, 7, 96), "pooled_prompt_embeds": torch.randn(2, 64)}
    t = torch.tensor([250.0, 900.0])
    with torch.no_grad():
        expected = transformer(hidden_states=latents, timestep=t, encoder_hidden_states=embeds["prompt_embeds"],
                               pooled_projections=embeds["pooled_prompt_embeds"], return_dict=False)[0]
        ours = SD35_LARGE.denoise(transformer, latents, t, embeds, {})
        scalar = SD35_LARGE.denoise(transformer, latents, torch.tensor(250.0), embeds, {})
        first = transformer(hidden_states=latents, timestep=t[:1].expand(2),
                            encoder_hidden_states=embeds["prompt_embeds"],
                            pooled_projections=embeds["pooled_prompt_embeds"], return_dict=False)[0]
    assert ours.shape == latents.shape
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(scalar, first, rtol=1e-6, atol=1e-6)


def test_names_module_on_its_own():
    config = SD35_LARGE.real_transformer_config()
    assert sd3_names.inner_dim(config) == 2432 and sd3_names.depth(config) == 38
    assert sd3_names.original_path("transformer_blocks.3.attn.to_add_out", config) == \
        "joint_blocks.3.context_block.attn.proj"
    assert sd3_names.original_path("transformer_blocks.37.norm1_context.linear", config) is None  # swapped halves
    assert sd3_names.original_path("transformer_blocks.36.norm1_context.linear", config) == \
        "joint_blocks.36.context_block.adaLN_modulation.1"
    assert sd3_names.original_path("transformer_blocks.0.attn.to_q", config) is None  # a row slice of qkv
    assert sd3_names.diffusers_path("t_embedder.mlp.2", config) == "time_text_embed.timestep_embedder.linear_2"
    assert sd3_names.diffusers_path("joint_blocks.37.context_block.adaLN_modulation.1", config) is None
    with pytest.raises(TypeError, match="SD3Transformer2DModel"):
        sd3_names.inner_dim(42)


def test_file_metadata():
    meta = training_metadata(SD35_MEDIUM, {"algo": "lokr"}, 8, 8.0)
    assert meta["modelspec.architecture"] == "stable-diffusion-3-5-medium/lora"
    assert meta["modelspec.implementation"] == "diffusers" and meta["modelspec.resolution"] == "1024x1024"
    assert SD35_LARGE.variant(None) == "sd35-large" and SD35_LARGE.default_prediction == "flow"
    assert SD35_LARGE.objective == "flow" and SD35_LARGE.scheduler_config["shift"] == 3.0


def test_cli_tiny_model(tmp_path):
    from lokr_diffusion.cli import main
    from lokr_diffusion.models import load_pipeline

    assert main(["tiny-model", "--family", "sd3", "--out", str(tmp_path / "m")]) == 0
    pipe = load_pipeline(str(tmp_path / "m"))  # model_index.json -> StableDiffusion3Pipeline, checked
    assert isinstance(pipe, StableDiffusion3Pipeline) and family_of_pipeline(pipe) is SD35_LARGE
    assert isinstance(pipe.transformer, SD3Transformer2DModel)
    assert main(["tiny-model", "--family", "sd35-medium", "--out", str(tmp_path / "med")]) == 0
    assert load_pipeline(str(tmp_path / "med"), family="sd3-medium").transformer.config.dual_attention_layers == [0]


def test_sd35_lokr_config_and_its_comment(capsys):
    """train_configs/sd35_lokr.toml: the numbers its comment quotes are the ones plan --config
    reports on the real SD3.5 Large architecture (no download: the meta device)."""
    path = Path(__file__).resolve().parent.parent / "train_configs" / "sd35_lokr.toml"
    r = run_json(capsys, "plan", "--config", path)
    assert r["family"] == "sd35-large" and r["modules"] == {"unet": PRESET_COUNTS["sd35-large"]["attn-mlp"][0]}
    m = r["memory"]
    assert m["frozen_weights"] == 2 * REAL["sd35-large"][0]  # text encoders frozen, parked after caching
    text = path.read_text()
    for number in (r["parameters"], r["file_size"]["bf16"], r["file_size"]["fp16"], r["file_size"]["fp32"],
                   REAL["sd35-large"][0]):
        assert f"{number:,}" in text, number
    for gib in (m["total"], m["frozen_weights"], m["adapter"], m["activations"], m["caching_text_encoders"]):
        assert f"{gib / 2**30:.1f} GiB" in text, gib
    assert f"({m['total'] / 1e9:.1f} GB)" in text
    assert m["activations_how"].startswith("counted")

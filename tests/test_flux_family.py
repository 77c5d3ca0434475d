"""Flux.1 [dev] / [schnell]: real architectures and preset counts on the meta device, keys,
detection, the tiny offline FluxPipeline, and the conditioning the trainer will call.

The counts here are those of the family docstring (lokr_diffusion/families/flux.py) and of
the DiT spec (504 Linears, 11.90 B parameters for Flux.1-dev).
"""
from __future__ import annotations

import re

import pytest
import torch
from diffusers import FluxPipeline
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from lokr_diffusion import AdapterConfig, create_network, load_network
from lokr_diffusion.families import (
    FLUX_DEV,
    FLUX_SCHNELL,
    SD1,
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
from lokr_diffusion.families.flux import image_ids, pack_latents, unpack_latents
from lokr_diffusion.families.t5_tokenizer import write_tiny_t5_tokenizer
from lokr_diffusion.fileformat import training_metadata
from lokr_diffusion.loading import build_alias_table

# (transformer parameters, Linears in it, [CLIP-L, T5-XXL] parameters)
REAL = {"flux": (11_901_408_320, 504, [123_060_480, 4_762_310_656]),
        "flux-schnell": (11_891_178_560, 502, [123_060_480, 4_762_310_656])}
# modules per preset: (transformer, CLIP-L, T5)
PRESET_COUNTS = {
    "flux": {"attn-only": (266, 48, 96), "attn-mlp": (418, 72, 168), "full": (504, 72, 168)},
    "flux-schnell": {"attn-only": (266, 48, 96), "attn-mlp": (418, 72, 168), "full": (502, 72, 168)},
}
TINY_COUNTS = {"attn-only": (2 * 8 + 2 * 3, 2 * 4, 2 * 4), "attn-mlp": (2 * 12 + 2 * 5, 2 * 6, 2 * 7)}


@pytest.fixture(scope="module", params=sorted(REAL))
def meta(request):
    return request.param, get_family(request.param).build_meta()


@pytest.fixture(scope="module")
def tiny_pipe(tiny_flux_path):
    pipe = FluxPipeline.from_pretrained(str(tiny_flux_path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _count(network, component):
    return sum(1 for c in network.components.values() if c == component)


def _linears(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


# -- real architectures --------------------------------------------------------------------------
def test_meta_models_match_published_architectures(meta):
    name, (transformer, encoders) = meta
    n_params, n_linear, n_text = REAL[name]
    assert transformer.device.type == "meta"
    assert sum(p.numel() for p in transformer.parameters()) == n_params
    assert len(_linears(transformer)) == n_linear
    assert [sum(p.numel() for p in e.parameters()) for e in encoders] == n_text
    assert isinstance(encoders[0], CLIPTextModel) and isinstance(encoders[1], T5EncoderModel)
    t5 = encoders[1].config
    assert (t5.d_model, t5.d_ff, t5.num_layers, t5.num_heads, t5.d_kv, t5.is_gated_act, t5.vocab_size) == \
        (4096, 10240, 24, 64, 64, True, 32128)
    assert transformer.config.guidance_embeds is (name == "flux")


def test_preset_counts_on_the_real_architecture(meta):
    name, (transformer, encoders) = meta
    family = get_family(name)
    for preset, expected in PRESET_COUNTS[name].items():
        net = create_network(AdapterConfig(preset=preset, factor=8, dim=4), transformer, encoders, family=family)
        got = tuple(_count(net, c) for c in ("unet", "te1", "te2"))
        assert got == expected, (name, preset, got)
        net.remove()
    chosen = family.preset_filter(transformer, "full")
    assert all(chosen(p) for p in _linears(transformer))  # full: every Linear
    mlp_only = family.preset_filter(transformer, "attn-mlp")
    assert not any(mlp_only(p) for p in _linears(transformer) if re.search(r"norm1?(_context)?\.linear$", p))


def test_keys_and_aliases(meta):
    name, (transformer, encoders) = meta
    family = get_family(name)
    net = create_network(AdapterConfig(preset="full"), transformer, encoders, family=family)
    keys = set(net.module_keys())
    for k in ["lycoris_transformer_blocks_0_attn_to_q", "lycoris_transformer_blocks_18_attn_to_add_out",
              "lycoris_transformer_blocks_0_ff_context_net_0_proj", "lycoris_transformer_blocks_0_norm1_context_linear",
              "lycoris_single_transformer_blocks_37_proj_out", "lycoris_single_transformer_blocks_0_norm_linear",
              "lycoris_x_embedder", "lycoris_time_text_embed_text_embedder_linear_1", "lycoris_norm_out_linear",
              "lycoris_proj_out", "lora_te1_text_model_encoder_layers_11_self_attn_q_proj",
              "lora_te1_text_model_encoder_layers_0_mlp_fc2", "lora_te2_encoder_block_0_layer_0_SelfAttention_q",
              "lora_te2_encoder_block_23_layer_1_DenseReluDense_wo"]:
        assert k in keys, k
    assert ("lycoris_time_text_embed_guidance_embedder_linear_1" in keys) is (name == "flux")
    assert not any(k.startswith(("lora_unet_", "lora_te_", "lora_te2_text_model")) for k in keys)
    net.remove()
    table = build_alias_table(transformer, encoders, family)
    for alias, canonical in [
        ("lora_transformer_transformer_blocks_0_attn_to_q", "lycoris_transformer_blocks_0_attn_to_q"),
        ("lora_transformer_single_transformer_blocks_3_proj_mlp", "lycoris_single_transformer_blocks_3_proj_mlp"),
        ("lora_te3_encoder_block_5_layer_0_SelfAttention_o", "lora_te2_encoder_block_5_layer_0_SelfAttention_o"),
        ("lora_te1_encoder_layers_0_mlp_fc1", "lora_te1_text_model_encoder_layers_0_mlp_fc1"),
    ]:
        assert table[alias][1] == canonical, alias


def test_text_encoder_api_keeps_the_sd_keys():
    """The Family text-encoder methods give SD exactly the keys sd-scripts writes."""
    sd2 = get_family("sd2")
    assert SD1.text_encoder_key(0, "encoder.layers.0.mlp.fc1") == "lora_te_text_model_encoder_layers_0_mlp_fc1"
    assert SDXL.text_encoder_key(1, "text_model.encoder.layers.0.self_attn.q_proj") == \
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    assert "lora_te1_text_model_encoder_layers_0_mlp_fc1" in sd2.text_encoder_key_aliases(0, "encoder.layers.0.mlp.fc1")
    assert SD1.text_preset_filter(0, None, "attn-only")("encoder.layers.0.self_attn.out_proj")
    assert not SD1.text_preset_filter(0, None, "attn-only")("encoder.layers.0.mlp.fc1")
    assert FLUX_DEV.text_encoder_key(1, "encoder.block.0.layer.0.SelfAttention.q") == \
        "lora_te2_encoder_block_0_layer_0_SelfAttention_q"
    assert (SD1.default_trained_text_encoders, SDXL.default_trained_text_encoders,
            FLUX_DEV.default_trained_text_encoders) == ((0,), (0, 1), (0,))


# -- detection ------------------------------------------------------------------------------------
def test_detect_models_and_pipeline_classes(meta):
    name, (transformer, encoders) = meta
    family = get_family(name)
    assert family_of_models(transformer, encoders) is family
    assert family_of_models(transformer.config) is family
    assert family_of_models(family.tiny_transformer_config()) is family
    assert family_of_text_encoders(encoders) is FLUX_DEV  # no denoiser: [dev], whose names cover both
    assert family_of_text_encoders(encoders[:1]) is SD1  # a lone CLIP-L is SD 1.x's, as before
    assert family_of_pipeline_class("FluxPipeline") is FLUX_DEV
    assert family_of_pipeline_class("FluxImg2ImgPipeline") is FLUX_DEV
    assert family_of_pipeline_class("Flux2Pipeline").name == "flux2"  # another architecture: a family of its own
    for other in ("FluxKontextPipeline", "FluxFillPipeline"):
        assert family_of_pipeline_class(other) is None, other
    assert family_of_pipeline_class("StableDiffusion3Pipeline") is SD35_LARGE


def test_detect_checkpoints_and_metadata():
    dev = ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "guidance_in.in_layer.weight"]
    schnell = [k for k in dev if not k.startswith("guidance_in")]
    assert family_of_checkpoint_keys(dev) is FLUX_DEV
    assert family_of_checkpoint_keys(["model.diffusion_model." + k for k in schnell]) is FLUX_SCHNELL
    assert family_of_checkpoint_keys(["model.diffusion_model.input_blocks.0.0.weight"]) is None
    for family in (FLUX_DEV, FLUX_SCHNELL):
        assert family_of_metadata(family.file_metadata()) is family
    assert family_of_metadata({"ss_base_model_version": "flux1"}) is FLUX_DEV  # what sd-scripts writes
    assert family_of_metadata({"modelspec.architecture": "flux-1-schnell/lora", "ss_base_model_version": "flux1"}) \
        is FLUX_SCHNELL
    assert family_of_metadata({"ss_base_model_version": "sdxl_base_v1-0"}) is SDXL
    assert family_of_metadata({"modelspec.architecture": "chroma/lora"}) is None


@pytest.mark.parametrize("key", [
    "lycoris_single_transformer_blocks_1_proj_mlp", "lora_unet_double_blocks_0_img_attn_qkv",
    "lora_unet_single_blocks_3_linear1", "transformer.single_transformer_blocks.0.attn.to_q",
    "diffusion_model.double_blocks.0.img_attn.qkv", "lora_te2_encoder_block_0_layer_0_SelfAttention_q",
    "lycoris_x_embedder",
])
def test_adapter_files_are_recognised_as_flux(key):
    from lokr_diffusion.families import FLUX2

    found = family_of_adapter_keys([key])
    # names Flux.2 uses too leave the file open to it: a lone key cannot tell
    shared = {"lora_unet_double_blocks_0_img_attn_qkv": (FLUX2,), "lora_unet_single_blocks_3_linear1": (FLUX2,),
              "diffusion_model.double_blocks.0.img_attn.qkv": (FLUX2,), "lycoris_x_embedder": (FLUX2,)}.get(key, ())
    assert set(found.candidates) == {FLUX_DEV, FLUX_SCHNELL, *shared}
    assert found.allows(FLUX_SCHNELL) and not found.allows(SDXL)
    assert family_of_adapter_keys([key], {"ss_base_model_version": "flux1"}).candidates == (FLUX_DEV, FLUX_SCHNELL)
    # dev and schnell share every key but the guidance embedder: without it or a modelspec.architecture
    # naming one of them, the file is "Flux.1" (either); ss_base_model_version "flux1" is written for both
    undecided = family_of_adapter([("unet", key, (4, 4))], {"ss_base_model_version": "flux1"})
    assert undecided.candidates == (FLUX_DEV, FLUX_SCHNELL) and undecided.family is None
    assert (undecided.name, undecided.title) == ("flux.1", "Flux.1 [dev] or Flux.1 [schnell]")
    schnell = {"modelspec.architecture": "flux-1-schnell/lora"}
    assert family_of_adapter([("unet", key, (4, 4))], schnell).family is FLUX_SCHNELL
    assert family_of_adapter([("unet", key, (4, 4))], {"modelspec.architecture": "flux-1-dev/lora"}).family is FLUX_DEV
    guidance = ("unet", "lycoris_time_text_embed_guidance_embedder_linear_1", (4, 4))
    assert family_of_adapter([("unet", key, (4, 4)), guidance], schnell).family is FLUX_DEV  # keys win


@pytest.mark.parametrize("key", ["lycoris_transformer_blocks_0_attn_to_q",
                                 "lora_transformer_transformer_blocks_0_attn_to_q", "transformer_blocks.0.attn.to_q"])
def test_double_block_names_are_shared_with_sd3(key):
    """SD3's joint blocks have the Diffusers names of Flux's double blocks (and Flux.2's and, but in
    OneTrainer's lora_transformer_ layout, Qwen-Image's blocks): the names alone say nothing, the
    attention width does (Flux.1, Flux.2 [klein] and Qwen-Image 3072, SD3.5 Large 2432, Medium 1536)."""
    from lokr_diffusion.families import FLUX2, QWEN_IMAGE

    named = (FLUX2, FLUX_DEV, FLUX_SCHNELL, SD35_LARGE, SD35_MEDIUM) + (() if key.startswith("lora_transformer_")
                                                                        else (QWEN_IMAGE,))
    assert family_of_adapter_keys([key]).candidates == named
    assert family_of_adapter_keys([key], {"ss_base_model_version": "flux1"}).candidates == (FLUX_DEV, FLUX_SCHNELL)
    wide = tuple(f for f in named if f.attention_width == 3072)
    assert family_of_adapter([("unet", key, (3072, 3072))], {}).candidates == wide
    assert family_of_adapter([("unet", key, (4, 4))], {}).candidates == named  # no width or metadata: open to all
    schnell = {"modelspec.architecture": "flux-1-schnell/lora"}
    assert family_of_adapter([("unet", key, (3072, 3072))], schnell).family is FLUX_SCHNELL
    assert family_of_adapter([("unet", key, (2432, 2432))], {}).family is SD35_LARGE
    assert family_of_adapter([("unet", key, (1536, 1536))], {}).family is SD35_MEDIUM


def test_sd_adapter_files_are_not_flux():
    sd = family_of_adapter_keys(["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                                 "lora_te_text_model_encoder_layers_0_mlp_fc1"])
    assert [f.name for f in sd.candidates] == ["sd1", "sd2"]
    xl = family_of_adapter_keys(["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_te2_x_y"])
    assert xl.family is SDXL
    assert family_of_adapter_keys(["lycoris_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]).family \
        is None


# -- tiny pipeline --------------------------------------------------------------------------------
def _tree(model) -> dict[str, str]:
    return {re.sub(r"(transformer_blocks|block)\.\d+", r"\1.*", n): type(m).__name__ for n, m in model.named_modules()}


def test_tiny_pipeline_is_flux_shaped(tiny_pipe, tiny_flux_path):
    transformer, encoders = FLUX_DEV.build_meta()
    assert _tree(tiny_pipe.transformer) == _tree(transformer)
    assert _tree(tiny_pipe.text_encoder_2) == _tree(encoders[1])
    assert family_of_pipeline(tiny_pipe) is FLUX_DEV
    vae = tiny_pipe.vae.config
    assert (vae.latent_channels, vae.scaling_factor, vae.shift_factor) == (16, 0.3611, 0.1159)
    assert tiny_pipe.vae_scale_factor == 8 and tiny_pipe.transformer.config.in_channels == 64
    sched = tiny_pipe.scheduler.config
    assert (sched.use_dynamic_shifting, sched.base_shift, sched.max_shift) == (True, 0.5, 1.15)
    assert isinstance(tiny_pipe.tokenizer, CLIPTokenizer) and isinstance(tiny_pipe.tokenizer_2, T5TokenizerFast)
    files = [p for p in tiny_flux_path.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 20e6 and not [p for p in files if p.suffix == ".bin"]


def test_tiny_pipeline_generates_64px(tiny_pipe):
    out = tiny_pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, max_sequence_length=16,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


def test_tiny_build_is_deterministic(tmp_path, tiny_flux_path):
    from safetensors.torch import load_file

    name = "transformer/diffusion_pytorch_model.safetensors"
    again = load_file(FLUX_DEV.build_tiny(tmp_path / "a", seed=0) / name)
    ref = load_file(tiny_flux_path / name)
    assert ref.keys() == again.keys() and all(torch.equal(ref[k], again[k]) for k in ref)
    schnell = FLUX_SCHNELL.build_tiny(tmp_path / "s", seed=1)
    assert family_of_pipeline(FluxPipeline.from_pretrained(str(schnell))) is FLUX_SCHNELL


def test_t5_tokenizer_round_trip(tmp_path):
    written = write_tiny_t5_tokenizer(tmp_path / "t5")
    tok = T5TokenizerFast.from_pretrained(str(tmp_path / "t5"))
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.model_max_length) == (0, 1, 2, 512)
    caption = "a photo of a cute dog sitting on the beach"
    ids = tok(caption).input_ids
    assert ids == written(caption).input_ids and ids[-1] == 1 and len(ids) == len(caption.split()) + 1
    assert tok.decode(ids, skip_special_tokens=True) == caption
    assert tok.unk_token_id not in tok("Xyzzy 42!").input_ids  # unknown words fall back to characters
    assert tok("cat", padding="max_length", max_length=5).input_ids == [tok.convert_tokens_to_ids("\u2581cat"), 1, 0, 0, 0]


def test_adapter_on_the_tiny_pipeline(tiny_pipe, tmp_path):
    parts = [tiny_pipe.text_encoder, tiny_pipe.text_encoder_2]
    for preset, expected in TINY_COUNTS.items():
        net = create_network(AdapterConfig(algo="lokr", preset=preset, factor=4, dim=4), tiny_pipe.transformer, parts)
        assert net.family is FLUX_DEV
        assert tuple(_count(net, c) for c in ("unet", "te1", "te2")) == expected, preset
        if preset == "attn-mlp":
            with torch.no_grad():
                for p in net.parameters():
                    p.normal_(0, 0.1)
            path = net.save(tmp_path / "flux.safetensors", dtype=torch.float32)
        net.remove()
    loaded, report = load_network(str(path), tiny_pipe.transformer, parts, strict=True)
    assert len(loaded.module_keys()) == sum(TINY_COUNTS["attn-mlp"]) and not report.unmatched
    loaded.remove()
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "flux-1-dev/lora" and meta["ss_base_model_version"] == "flux1"
    assert "modelspec.prediction_type" not in meta


# -- conditioning: what the trainer calls must be what FluxPipeline does ---------------------------
def test_encode_text_matches_the_pipeline(tiny_pipe):
    caption = ["a red car on a street"]
    ids = [tiny_pipe.tokenizer(caption, padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids,
           tiny_pipe.tokenizer_2(caption, padding="max_length", max_length=32, truncation=True,
                                 return_tensors="pt").input_ids]
    with torch.no_grad():
        ours = FLUX_DEV.encode_text([tiny_pipe.text_encoder, tiny_pipe.text_encoder_2], ids, torch.device("cpu"))
        prompt, pooled, _ = tiny_pipe.encode_prompt(caption, device=torch.device("cpu"), max_sequence_length=32)
    assert torch.equal(ours["prompt_embeds"], prompt) and torch.equal(ours["pooled_prompt_embeds"], pooled)


def test_denoise_matches_the_pipeline_call(tiny_pipe):
    """4-D latents and 0-1000 timesteps in (the trainer's contract), the transformer called as
    FluxPipeline calls it (packed tokens, t / 1000, position ids, guidance), 4-D out."""
    transformer = tiny_pipe.transformer
    latents = torch.randn(2, 16, 8, 12)
    packed = pack_latents(latents)
    embeds = {"prompt_embeds": torch.randn(2, 7, 32), "pooled_prompt_embeds": torch.randn(2, 32)}
    s = torch.tensor([0.25, 0.9])
    with torch.no_grad():
        expected = transformer(hidden_states=packed, timestep=s, guidance=torch.full([2], 1.0),
                               pooled_projections=embeds["pooled_prompt_embeds"],
                               encoder_hidden_states=embeds["prompt_embeds"], txt_ids=torch.zeros(7, 3),
                               img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32),
                               return_dict=False)[0]
        for batch in ({}, {"guidance": 1.0}):
            ours = FLUX_DEV.denoise(transformer, latents, s * 1000, embeds, batch)
            assert ours.shape == latents.shape
            torch.testing.assert_close(pack_latents(ours), expected, rtol=1e-6, atol=1e-6)
        other = FLUX_DEV.denoise(transformer, latents, s * 1000, embeds, {"guidance": 3.5})
    assert not torch.allclose(pack_latents(other), expected)
    assert FLUX_DEV.image_tokens(latents) == 24


def test_latent_helpers():
    latents = torch.randn(1, 16, 6, 10)
    tokens = pack_latents(latents)
    assert tokens.shape == (1, 15, 64)
    assert torch.equal(unpack_latents(tokens, 6, 10), latents)
    ids = image_ids(6, 10)
    assert ids.shape == (15, 3) and ids[-1].tolist() == [0.0, 2.0, 4.0]
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.randn(1, 16, 5, 10))


def test_file_metadata():
    meta = training_metadata(FLUX_SCHNELL, {"algo": "lokr"}, 8, 8.0)
    assert meta["modelspec.architecture"] == "flux-1-schnell/lora"
    assert meta["modelspec.implementation"] == "diffusers" and meta["modelspec.resolution"] == "1024x1024"
    assert FLUX_DEV.variant(None) == "flux" and FLUX_DEV.default_prediction == "flow"


def test_cli_tiny_model(tmp_path):
    from lokr_diffusion.cli import main

    from lokr_diffusion.models import load_pipeline

    assert main(["tiny-model", "--family", "flux", "--out", str(tmp_path / "m")]) == 0
    pipe = load_pipeline(str(tmp_path / "m"))  # model_index.json -> FluxPipeline, checked against the weights
    assert isinstance(pipe, FluxPipeline) and family_of_pipeline(pipe) is FLUX_DEV
    assert load_pipeline(str(tmp_path / "m"), family="flux1").transformer.config.guidance_embeds

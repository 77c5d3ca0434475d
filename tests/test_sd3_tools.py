"""The toolbox on SD3 files through the family hooks (file layouts, layout keys, what ComfyUI reads):
`inspect` names the family, the key layout and ComfyUI's gaps; `convert --to <layout>` renames,
stacks LoRA q/k/v into kohya's fused `qkv` and splits it back, and the result loads into a tiny
SD3 transformer with the weights the input gives (the loader is the independent check: its name
table is tested against a restatement in test_sd3_layouts.py); `plan` knows the family by name
and picks the text encoders the trainer picks.

The toolbox works on the real architecture and scales its row ranges to the file's widths, so the
files patch block 0 and the layers outside the blocks of the tiny model (whose block 1 is the last,
unlike the real model's block 1).
"""
import pytest
import torch
from safetensors.torch import load_file, save_file

from lokr_diffusion.families import SD35_LARGE, SD35_MEDIUM, FLUX_DEV
from lokr_diffusion.errors import ConfigError
from lokr_diffusion.loading import load_network

from .test_flux_layouts import _factors, _linears, _state, assert_patched, reference_delta
from .test_sd3_layouts import LAYOUTS, _tiny
from .test_tools_helpers import run_cli, run_json

NAMES = {"lycoris": "lycoris", "lora_transformer": "lora_transformer", "transformer-dotted": "transformer",
         "bare-dotted": "bare", "base_model-dotted": "base_model", "kohya": "kohya",
         "diffusion_model-dotted": "diffusion_model"}


@pytest.fixture
def model():
    return _tiny()


def _layers(model):
    """Block 0 (both streams, attn2) and the layers outside the blocks."""
    return {p: m for p, m in _linears(model).items() if not p.startswith("transformer_blocks.1.")}


def _diffusers_file(model, layout, path, algo="lora", seed=0):
    """One module per chosen layer in a Diffusers-named layout; {path: scale * dW}."""
    key_of, original = LAYOUTS[layout]
    assert not original
    g = torch.Generator().manual_seed(seed)
    tensors, expected = {}, {}
    for p, layer in _layers(model).items():
        t = _factors(algo, layer.out_features, layer.in_features, g)
        tensors.update({f"{key_of(p)}.{n}": v for n, v in t.items()})
        expected[p] = reference_delta(t)
    save_file(tensors, str(path))
    return expected


def _loads_as(model, path, expected):
    original = _state(model)
    network, report = load_network(path, unet=model, family=SD35_MEDIUM, strict=True)
    assert not report.unmatched
    network.merge()
    assert_patched(model, original, expected)
    network.remove()
    model.load_state_dict(original)



@pytest.mark.parametrize("layout", sorted(NAMES))
def test_inspect_names_family_layout_and_comfyui_support(capsys, model, tmp_path, layout):
    from .test_sd3_layouts import make_file

    make_file(model, layout, "lora", tmp_path / "a.safetensors")
    r = run_json(capsys, "inspect", tmp_path / "a.safetensors")
    assert r["family"] == "sd35-medium" and "attn2" in r["family_source"]
    assert list(r["key_layouts"]) == [NAMES[layout]]
    comfy = {u["ui"]: u["support"] for u in r["ui_support"]}["ComfyUI"]
    n = sum(r["key_layouts"].values())
    if layout == "bare-dotted":
        assert comfy.startswith(f"skips {n} of {n} transformer modules")
    elif layout in ("kohya", "diffusion_model-dotted"):
        assert comfy.startswith(f"applies all {n}")
    else:  # Diffusers names: ComfyUI's SD3 table has no attn2 (4 layers in block 0)
        assert comfy.startswith(f"skips 4 of {n} transformer modules")


def test_inspect_large_file_without_evidence(capsys, model, tmp_path):
    """No attn2, no metadata, tiny widths: Large or Medium, and the text says so."""
    path = tmp_path / "a.safetensors"
    tensors = {f"lora_unet_joint_blocks_0_x_block_attn_proj.{n}": v
               for n, v in _factors("lora", 32, 32, torch.Generator().manual_seed(1)).items()}
    save_file(tensors, str(path), {"ss_base_model_version": "sd3"})
    r = run_json(capsys, "inspect", path)
    assert r["family"] == "sd3.x" and "no key or metadata says which" in r["family_source"]
    save_file(tensors, str(path), SD35_LARGE.file_metadata())
    assert run_json(capsys, "inspect", path)["family"] == "sd35-large"


def test_convert_stacks_qkv_into_kohya_and_splits_it_back(capsys, model, tmp_path):
    expected = _diffusers_file(model, "lycoris", tmp_path / "in.safetensors")
    r = run_json(capsys, "convert", tmp_path / "in.safetensors", tmp_path / "kohya.safetensors", "--to", "kohya")
    # x qkv, context qkv, attn2 qkv stacked; norm_out.linear moved into the final modulation (rows swapped)
    assert r["family"] == "sd35-medium" and r["stacked"] == 4
    out = load_file(tmp_path / "kohya.safetensors")
    modules = {k.rsplit(".", 2)[0] if ".lora_" in k else k.rsplit(".", 1)[0] for k in out}
    assert {"lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_joint_blocks_0_context_block_attn_qkv",
            "lora_unet_joint_blocks_0_x_block_attn2_qkv", "lora_unet_final_layer_adaLN_modulation_1",
            "lora_unet_t_embedder_mlp_0", "lora_unet_joint_blocks_0_x_block_attn2_proj"} <= modules
    assert not any("transformer_blocks" in m for m in modules)
    _loads_as(model, tmp_path / "kohya.safetensors", expected)
    r = run_json(capsys, "convert", tmp_path / "kohya.safetensors", tmp_path / "back.safetensors", "--to",
                 "base_model")
    assert r["split"] == 4  # the three qkv and the swapped final modulation
    back = load_file(tmp_path / "back.safetensors")
    assert all(k.startswith("base_model.model.") for k in back)
    _loads_as(model, tmp_path / "back.safetensors", expected)


@pytest.mark.parametrize("to", ["transformer", "bare", "lora_transformer", "diffusion_model"])
def test_convert_lokr_between_layouts(capsys, model, tmp_path, to):
    """LoKr renames between Diffusers-named layouts; to original names its q/k/v cannot be stacked."""
    expected = _diffusers_file(model, "lycoris", tmp_path / "in.safetensors", algo="lokr-lowrank")
    code, out, err = run_cli(capsys, "convert", tmp_path / "in.safetensors", tmp_path / "out.safetensors", "--to", to)
    if to == "diffusion_model":
        assert code != 0 and "stack" in (out + err)
        return
    assert code == 0, err
    _loads_as(model, tmp_path / "out.safetensors", expected)


def test_layout_names_other_families_lack_are_refused():
    with pytest.raises(ConfigError, match=r"Flux\.1 \[dev\] files have no 'base_model' key layout"):
        FLUX_DEV.layout_key("base_model", "transformer_blocks.0.attn.to_q")
    assert SD35_LARGE.layout_key("kohya", "transformer_blocks.0.attn.to_q") is None  # a row slice of qkv
    assert SD35_LARGE.layout_key("kohya", "transformer_blocks.37.norm1_context.linear") is None  # swapped halves
    assert SD35_LARGE.layout_key("kohya", "transformer_blocks.36.norm1_context.linear") == \
        "lora_unet_joint_blocks_36_context_block_adaLN_modulation_1"
    assert SD35_MEDIUM.denoiser_layout("lora_unet_transformer_blocks_0_attn_to_q") is None  # the PEFT reader's
    assert SD35_MEDIUM.denoiser_layout("lora_te3_encoder_block_0_layer_0_SelfAttention_q") is None


def test_plan_by_family_name(capsys):
    r = run_json(capsys, "plan", "--model", "sd35-medium", "--preset", "attn-only", "--no-memory")
    # the text encoders the trainer picks by default: the two CLIP towers, T5 left out
    assert r["family"] == "sd35-medium" and r["modules"] == {"unet": 243, "te1": 48, "te2": 128}

"""`lokr-diffusion inspect` on Flux.1 files: family (dev, schnell, or "Flux.1" when nothing says
which), key layout (one of the DiT spec's six, or mixed) and what each UI does with the keys.

The files are written by the independent restatement of the spec in test_flux_layouts (names
table and math), not by the package.
"""
import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file, save_file

from .test_flux_layouts import LAYOUTS, TINY, _factors, make_file
from .test_tools_helpers import run_cli, run_json

# the test module's layout names -> the ones the package reports (flux_names.LAYOUTS)
NAMES = {"lycoris": "lycoris", "lora_transformer": "lora_transformer", "transformer-dotted": "transformer",
         "bare-dotted": "bare", "kohya": "kohya", "diffusion_model-dotted": "diffusion_model"}
FORGE_READS = {"lycoris", "lora_transformer", "transformer", "kohya", "diffusion_model"}  # not bare paths
MODULES = {False: 30, True: 23}  # one double and one single block: 30 Diffusers layers, 23 original ones


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return FluxTransformer2DModel(**TINY).eval().requires_grad_(False)


def _ui(report):
    return {u["ui"]: u["support"] for u in report["ui_support"]}


@pytest.mark.parametrize("algo", ["lokr", "lora"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_family_and_ui_support(capsys, model, tmp_path, layout, algo):
    path = tmp_path / "a.safetensors"
    make_file(model, layout, algo, path)  # every layer, the guidance embedder too: only [dev] has it
    r = run_json(capsys, "inspect", path)
    n = MODULES[LAYOUTS[layout][1]]
    assert r["family"] == "flux" and "guidance embedder" in r["family_source"]
    assert (r["key_layout"], r["key_layouts"]) == (NAMES[layout], {NAMES[layout]: n})
    assert r["components"] == {"unet": n} and r["denoiser"] == "transformer"
    ui = _ui(r)
    assert ui["ComfyUI"].startswith(f"applies all {n} transformer modules")
    if NAMES[layout] in FORGE_READS:
        assert ui["Forge"].startswith(f"applies all {n} transformer modules")
    else:
        assert ui["Forge"].startswith(f"skips {n} of {n} transformer modules") and "convert --to" in ui["Forge"]
    assert ui["AUTOMATIC1111"].startswith("not checked")
    assert r["warnings"] == []
    code, out, _ = run_cli(capsys, "inspect", path)
    assert code == 0
    assert "family:      Flux.1 [dev] (from keys (the guidance embedder" in out
    assert f"key layout:  {NAMES[layout]} ({n} transformer modules): " in out
    assert "in the UIs:" in out and "  AUTOMATIC1111  not checked" in out
    blocks = "double_blocks.0 10, single_blocks.0 3" if LAYOUTS[layout][1] else \
        "transformer_blocks.0 14, single_transformer_blocks.0 6"
    assert f"  transformer {blocks}, other 10" in out  # the embedders and final layers are in no block


def _attention_only(model, path, metadata=None):
    """q/k/v of the double block, lycoris_ keys: no module that tells dev from schnell."""
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for x in "qkv":
        for n, v in _factors("lora", 32, 32, g).items():
            tensors[f"lycoris_transformer_blocks_0_attn_to_{x}.{n}"] = v
    save_file(tensors, str(path), metadata)
    return path


def test_dev_or_schnell_only_from_evidence(capsys, model, tmp_path):
    undecided = run_json(capsys, "inspect", _attention_only(model, tmp_path / "a.safetensors",
                                                             {"ss_base_model_version": "flux1"}))
    assert undecided["family"] == "flux.1" and "no key or metadata says which" in undecided["family_source"]
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "a.safetensors")
    assert code == 0 and "family:      Flux.1 (from keys (module names); no key or metadata says which of Flux.1 " \
                         "[dev] or Flux.1 [schnell])" in out
    schnell = run_json(capsys, "inspect", _attention_only(model, tmp_path / "s.safetensors",
                                                           {"modelspec.architecture": "flux-1-schnell/lora"}))
    assert schnell["family"] == "flux-schnell" and "modelspec.architecture" in schnell["family_source"]
    dev = run_json(capsys, "inspect", _attention_only(model, tmp_path / "d.safetensors",
                                                      {"modelspec.architecture": "flux-1-dev/lora"}))
    assert dev["family"] == "flux"


def test_mixed_layouts_and_forge_skipping_bare_keys(capsys, model, tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    make_file(model, "kohya", "lora", a)
    make_file(model, "bare-dotted", "lora", b)
    kohya, bare = load_file(a), load_file(b)
    mixed = {k: v for k, v in kohya.items() if "double_blocks" in k}  # 10 original double-block layers
    mixed.update({k: v for k, v in bare.items() if k.startswith("single_transformer_blocks.")})  # 6 layers
    save_file(mixed, str(tmp_path / "m.safetensors"))
    r = run_json(capsys, "inspect", tmp_path / "m.safetensors")
    assert r["key_layout"] == "mixed" and r["key_layouts"] == {"bare": 6, "kohya": 10}
    assert _ui(r)["Forge"].startswith("skips 6 of 16 transformer modules")
    _, out, _ = run_cli(capsys, "inspect", tmp_path / "m.safetensors")
    assert "key layout:  mixed: bare 6, kohya 10" in out


def test_linear1_qkv_is_skipped_by_forge(capsys, model, tmp_path):
    g = torch.Generator().manual_seed(2)
    t = {f"lora_unet_single_blocks_0_linear1_qkv.{n}": v for n, v in _factors("lora", 96, 32, g).items()}
    t.update({f"lora_unet_double_blocks_0_img_attn_qkv.{n}": v for n, v in _factors("lora", 96, 32, g).items()})
    save_file(t, str(tmp_path / "q.safetensors"))
    r = run_json(capsys, "inspect", tmp_path / "q.safetensors")
    assert r["key_layout"] == "kohya"
    assert _ui(r)["Forge"].startswith("skips 1 of 2") and _ui(r)["ComfyUI"].startswith("applies all 2")


def test_tucker_and_dora_warnings_stay(capsys, model, tmp_path):
    g = torch.Generator().manual_seed(3)
    t = {"lycoris_transformer_blocks_0_attn_to_q.lokr_w1": torch.randn(4, 2, generator=g),
         "lycoris_transformer_blocks_0_attn_to_q.lokr_w2_a": torch.randn(2, 8, generator=g),
         "lycoris_transformer_blocks_0_attn_to_q.lokr_w2_b": torch.randn(2, 16, generator=g),
         "lycoris_transformer_blocks_0_attn_to_q.lokr_t2": torch.randn(2, 2, 1, 1, generator=g),
         "lycoris_transformer_blocks_0_attn_to_q.alpha": torch.tensor(2.0)}
    for n, v in _factors("lora", 32, 32, g).items():
        t[f"transformer.transformer_blocks.0.attn.to_k.{n}"] = v
    t["transformer.transformer_blocks.0.attn.to_k.dora_scale"] = torch.ones(1, 32)
    save_file(t, str(tmp_path / "w.safetensors"))
    r = run_json(capsys, "inspect", tmp_path / "w.safetensors")
    codes = {w["code"]: w["modules"] for w in r["warnings"]}
    assert codes["tucker"] == ["lycoris_transformer_blocks_0_attn_to_q"]
    assert codes["dora_scale"] == ["transformer.transformer_blocks.0.attn.to_k"]
    assert r["key_layouts"] == {"lycoris": 1, "transformer": 1}


def test_dotted_keys_are_grouped_into_modules(capsys, model, tmp_path):
    """`transformer.<path>.lora_down.weight`: the module key keeps its dots; alpha and factors stay together."""
    path = tmp_path / "a.safetensors"
    make_file(model, "transformer-dotted", "lokr-both-lowrank", path)
    r = run_json(capsys, "inspect", path)
    keys = {m["key"] for m in r["modules"]}
    assert "transformer.single_transformer_blocks.0.attn.to_q" in keys and len(keys) == 30
    assert all(m["alpha"] == 3.0 and m["algo"] == "lokr" for m in r["modules"])

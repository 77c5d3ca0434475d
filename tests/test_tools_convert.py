"""`lokr-diffusion convert`: layout changes that keep every module's effective weight."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lokr_diffusion import load_adapter, unload_adapter
from lokr_diffusion.tools.adapterfile import group_modules
from lokr_diffusion.tools.keymap import alias_table

from .helpers import load_components
from .test_tools_helpers import deltas, make_adapter, rewrite, run_cli, run_json


@pytest.fixture(scope="module")
def sd15(tiny_sd15_path):
    return load_components(tiny_sd15_path)


@pytest.fixture(scope="module")
def sd15_lokr(sd15, tmp_path_factory):
    path = tmp_path_factory.mktemp("convert") / "lokr.safetensors"
    make_adapter(*sd15, path, algo="lokr", preset="full", factor=4, dim=2, alpha=1.0, conv_dim=2, conv_alpha=3.0)
    return path


def _assert_same_deltas(a, b, tol=1e-5):
    assert set(a) == set(b)
    for k in a:
        rel = float((a[k] - b[k]).norm() / a[k].norm())
        assert rel <= tol, (k, rel)


def test_peft_to_lycoris_to_peft(capsys, sd15, tmp_path):
    peft = pytest.importorskip("peft")
    unet = copy.deepcopy(sd15[0])
    config = peft.LoKrConfig(r=4, alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"],
                             init_weights=False, decompose_factor=4, rank_pattern={"^down_blocks.0.*": 2},
                             alpha_pattern={".*attn2.*": 3.0})
    peft_unet = peft.inject_adapter_in_model(config, copy.deepcopy(unet))
    src = tmp_path / "peft_in"
    src.mkdir()
    sd = peft.get_peft_model_state_dict(peft_unet)
    save_file({"base_model.model." + k: v.contiguous() for k, v in sd.items()}, str(src / "adapter_model.safetensors"))
    (src / "adapter_config.json").write_text(json.dumps(config.to_dict(), default=list))

    lyco = tmp_path / "lycoris.safetensors"
    r = run_json(capsys, "convert", src, lyco, "--family", "sd15")
    assert (r["from"], r["to"], r["family"]) == ("peft", "lycoris", "sd1")
    assert r["changes"]["peft_scale_folded"] > 0 and r["max_rel_diff"] < 1e-5
    assert run_json(capsys, "inspect", lyco)["warnings"] == []

    x, ctx = torch.randn(1, 4, 16, 16), torch.randn(1, 5, 32)
    with torch.no_grad():
        want = peft_unet(x, 3, encoder_hidden_states=ctx).sample
        base = unet(x, 3, encoder_hidden_states=ctx).sample
        load_adapter(unet, lyco)
        got = unet(x, 3, encoder_hidden_states=ctx).sample
        unload_adapter(unet)
    assert (want - base).abs().max() > 1e-2
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()

    back = tmp_path / "peft_out"
    r = run_json(capsys, "convert", lyco, back)
    assert (r["from"], r["to"], r["component"]) == ("lycoris", "peft", "unet") and r["max_rel_diff"] < 1e-5
    cfg = json.loads((back / "adapter_config.json").read_text())
    assert cfg["decompose_factor"] == 4
    for k in ("peft_type", "task_type"):
        cfg.pop(k)
    peft_back = peft.inject_adapter_in_model(peft.LoKrConfig(**cfg), copy.deepcopy(unet))
    tensors = load_file(back / "adapter_model.safetensors")
    state = {k.removeprefix("base_model.model."): v for k, v in tensors.items()}
    result = peft.set_peft_model_state_dict(peft_back, state)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lokr" in k]
    with torch.no_grad():
        again = peft_back(x, 3, encoder_hidden_states=ctx).sample
    assert torch.allclose(again, want, atol=1e-4), (again - want).abs().max()


def test_sdxl_diffusers_names_and_te_without_text_model(capsys, tiny_sdxl_path, tmp_path):
    unet, tes = load_components(tiny_sdxl_path)
    src = tmp_path / "xl.safetensors"
    make_adapter(unet, tes, src, algo="lokr", preset="full", factor=4, dim=2, conv_dim=2)
    paths = {canon: target.path for _, (target, canon) in alias_table("sdxl").items() if target.component == "unet"}

    def other_style(t):
        out = {}
        for k, v in t.items():
            mod, _, name = k.partition(".")
            if mod.startswith("lora_unet_"):
                mod = "lora_unet_" + paths[mod].replace(".", "_")
            mod = mod.replace("text_model_", "")
            out[f"{mod}.{name}"] = v
        return out

    odd = rewrite(src, tmp_path / "odd.safetensors", other_style)
    assert {w["code"] for w in run_json(capsys, "inspect", odd)["warnings"]} == {"sdxl_diffusers_names",
                                                                                  "te_without_text_model"}
    fixed = tmp_path / "fixed.safetensors"
    r = run_json(capsys, "convert", odd, fixed)
    assert r["renamed"] == r["modules"] and r["unmatched"] == [] and r["max_abs_diff"] == 0
    want, got = load_file(src), load_file(fixed)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def _tucker_everywhere(t):
    """Every low-rank k x k conv becomes a Tucker module (t2 core, transposed w2_a)."""
    g = torch.Generator().manual_seed(7)
    for key in [k for k in t if k.endswith(".lokr_w2_b") and t[k].shape[1] % 9 == 0 and "conv" in k]:
        mod = key.rsplit(".", 1)[0]
        w2_a, w2_b = t.pop(f"{mod}.lokr_w2_a"), t.pop(f"{mod}.lokr_w2_b")
        r, b, d = w2_b.shape[0], w2_a.shape[0], w2_b.shape[1] // 9
        t[f"{mod}.lokr_t2"] = torch.randn(r, r, 3, 3, generator=g)
        t[f"{mod}.lokr_w2_a"] = torch.randn(r, b, generator=g)
        t[f"{mod}.lokr_w2_b"] = torch.randn(r, d, generator=g)
    return t


def test_tucker_to_plain_keeps_effective_weights(capsys, sd15, sd15_lokr, tmp_path):
    tucker = rewrite(sd15_lokr, tmp_path / "tucker.safetensors", _tucker_everywhere)
    count = sum(k.endswith("lokr_t2") for k in load_file(tucker))
    assert count > 10
    plain = tmp_path / "plain.safetensors"
    r = run_json(capsys, "convert", tucker, plain)
    assert r["changes"] == {"tucker": count} and r["max_rel_diff"] < 1e-5
    out = load_file(plain)
    assert not any(k.endswith("lokr_t2") for k in out)
    assert all(out[k].dim() == 4 for k in out if k.endswith("lokr_w2") and "conv" in k)
    assert run_json(capsys, "inspect", plain)["warnings"] == []
    # both factors are full now: scale 1 in every tool, the old alpha / r lives in w1
    _assert_same_deltas(deltas(tucker, *sd15), deltas(plain, *sd15))


def test_dtype_and_missing_alpha(capsys, sd15, sd15_lokr, tmp_path):
    keys = [k for k in load_file(sd15_lokr) if k.endswith(".alpha")][:3]
    no_alpha = rewrite(sd15_lokr, tmp_path / "no_alpha.safetensors",
                       lambda t: {k: v for k, v in t.items() if k not in keys})
    out = tmp_path / "fp16.safetensors"
    r = run_json(capsys, "convert", no_alpha, out, "--dtype", "fp16")
    assert r["changes"] == {"alpha_added": 3}
    assert 0 < r["max_rel_diff"] < 2e-3  # fp16 rounding, reported rather than hidden
    tensors = load_file(out)
    assert all(v.dtype == (torch.float32 if k.endswith(".alpha") else torch.float16) for k, v in tensors.items())
    assert all(k in tensors for k in keys)
    _assert_same_deltas(deltas(no_alpha, *sd15), deltas(out, *sd15), tol=2e-3)
    code, text, _ = run_cli(capsys, "convert", no_alpha, tmp_path / "again.safetensors")
    assert code == 0 and "max abs diff 0" in text and "alpha written where missing: 3" in text


def _add_dora(t):
    """A magnitude per output row on every module, as LyCORIS writes them."""
    g = torch.Generator().manual_seed(4)
    for key, m in group_modules(t).items():
        t[f"{key}.dora_scale"] = 1 + torch.rand(m.flat_shape()[0], 1, *([1, 1] if m.kernel() else []), generator=g)
    return t


def test_dora_file_converts_with_its_magnitudes_copied(capsys, sd15_lokr, tmp_path):
    dora = rewrite(sd15_lokr, tmp_path / "dora.safetensors", _add_dora)
    out = tmp_path / "out.safetensors"
    r = run_json(capsys, "convert", dora, out)
    assert r["max_rel_diff"] == 0
    want, got = load_file(dora), load_file(out)
    mags = [k for k in want if k.endswith(".dora_scale")]
    assert mags and all(torch.equal(got[k], want[k]) for k in mags)


def test_refusals_exit_2(capsys, sd15_lokr, tmp_path):
    dora = rewrite(sd15_lokr, tmp_path / "dora.safetensors", _add_dora)
    code, _, err = run_cli(capsys, "convert", dora, tmp_path / "x", "--to", "peft")
    assert code == 2 and "DoRA" in err and not (tmp_path / "x").exists()
    code, _, err = run_cli(capsys, "convert", tmp_path / "missing.safetensors", tmp_path / "y.safetensors")
    assert code == 2 and "no such file" in err
    code, _, err = run_cli(capsys, "convert", sd15_lokr, tmp_path / "out.bin", "--to", "lycoris")
    assert code == 2 and ".safetensors" in err

"""`lokr-diffusion extract`: recover a merged adapter; report the error honestly when it cannot."""
import pytest
import torch
from safetensors.torch import load_file

from lokr_diffusion.tools.adapterfile import group_modules
from lokr_diffusion.tools.extract import format_extract, nearest_kronecker

from .helpers import load_components
from .test_tools_helpers import make_adapter, run_cli, run_json


def _merged(capsys, base, tmp_path, name, **cfg):
    unet, tes = load_components(base)
    adapter = tmp_path / f"{name}.safetensors"
    make_adapter(unet, tes, adapter, seed=5, **cfg)
    tuned = tmp_path / f"{name}_merged"
    run_json(capsys, "merge", "--base", base, "--adapter", adapter, "--out", tuned)
    return adapter, tuned


@pytest.mark.parametrize("shape, a, c", [((12, 20), 3, 4), ((8, 6, 3, 3), 2, 3)])
def test_nearest_kronecker_is_exact_for_a_kronecker_product(shape, a, c):
    w1 = torch.randn(a, c)
    w2 = torch.randn(shape[0] // a, shape[1] // c, *shape[2:])
    dw = torch.kron(w1.reshape(a, c, *([1] * (len(shape) - 2))), w2)
    f1, f2 = nearest_kronecker(dw, a, c)
    approx = torch.kron(f1.reshape(a, c, *([1] * (len(shape) - 2))), f2)
    assert torch.allclose(approx, dw, atol=1e-5)


def test_lokr_full_factors_are_recovered(capsys, tiny_sd15_path, tmp_path):
    cfg = dict(algo="lokr", preset="full", factor=4, dim=10000, conv_dim=10000)  # both factors full
    adapter, tuned = _merged(capsys, tiny_sd15_path, tmp_path, "lokr", **cfg)
    out = tmp_path / "extracted.safetensors"
    r = run_json(capsys, "extract", "--base", tiny_sd15_path, "--tuned", tuned, "--out", out, "--algo", "lokr",
                 "--preset", "full", "--factor", "4", "--dim", "10000", "--conv-dim", "10000", "--dtype", "fp32")
    assert r["modules_extracted"] == len(group_modules(load_file(adapter)))
    assert r["max_relative_error"] < 1e-4 and r["overall_relative_error"] < 1e-4
    assert r["untargeted_changed_weights"] == []
    want, got = group_modules(load_file(adapter)), group_modules(load_file(out))
    assert set(got) == set(want)
    for key, m in want.items():
        assert {n: t.shape for n, t in got[key].tensors.items()} == {n: t.shape for n, t in m.tensors.items()}
        assert float(got[key].alpha) == float(m.alpha)  # alpha = rank: scale 1
        assert torch.allclose(got[key].delta(), m.delta(), atol=1e-5, rtol=1e-4)
    assert run_json(capsys, "inspect", out)["warnings"] == []


def test_lokr_low_rank_w2_and_skipped_modules(capsys, tiny_sd15_path, tmp_path):
    _, tuned = _merged(capsys, tiny_sd15_path, tmp_path, "attn", algo="lokr", preset="attn-only", factor=4, dim=2)
    out = tmp_path / "low.safetensors"
    r = run_json(capsys, "extract", "--base", tiny_sd15_path, "--tuned", tuned, "--out", out, "--preset", "attn-mlp",
                 "--factor", "4", "--dim", "2", "--dtype", "fp32")
    assert r["modules_unchanged"] > 0  # the MLP and proj layers did not change: skipped
    assert r["max_relative_error"] < 1e-4  # same factor, same rank: w2's second SVD is exact too
    assert any(k.endswith("lokr_w2_a") for k in load_file(out))


def test_lora_rank_1_of_rank_4_reports_its_error(capsys, tiny_sdxl_path, tmp_path):
    _, tuned = _merged(capsys, tiny_sdxl_path, tmp_path, "lora", algo="lora", preset="attn-only", dim=4)
    out = tmp_path / "lora1.safetensors"
    r = run_json(capsys, "extract", "--base", tiny_sdxl_path, "--tuned", tuned, "--out", out, "--algo", "lora",
                 "--preset", "attn-only", "--dim", "1")
    assert r["modules_extracted"] > 0 and r["family"] == "sdxl"
    assert 0.05 < r["overall_relative_error"] < 1 and r["max_relative_error"] < 1
    assert all(0 < m["relative_error"] < 1 for m in r["modules"])
    assert all(t.shape[0] == 1 for k, t in load_file(out).items() if k.endswith("lora_down.weight"))
    text = format_extract(r)
    assert "relative error" in text and f"worst module {r['max_relative_error']:.3g}" in text
    # the reported error is the real one, and the best a rank-1 factorization can do (Eckart-Young)
    (unet, _), (tuned_unet, _) = load_components(tiny_sdxl_path), load_components(tuned)
    key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    path = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    dw = tuned_unet.get_submodule(path).weight - unet.get_submodule(path).weight
    saved = load_file(out)
    approx = saved[f"{key}.lora_up.weight"].float() @ saved[f"{key}.lora_down.weight"].float()
    reported = next(m["relative_error"] for m in r["modules"] if m["key"] == key)
    assert abs(float((dw - approx).norm() / dw.norm()) - reported) < 1e-3
    s_vals = torch.linalg.svdvals(dw)
    assert abs(float(s_vals[1:].norm() / s_vals.norm()) - reported) < 1e-3


def test_identical_models_and_bad_paths_exit_2(capsys, tiny_sd15_path, tmp_path):
    code, _, err = run_cli(capsys, "extract", "--base", tiny_sd15_path, "--tuned", tiny_sd15_path,
                           "--out", tmp_path / "x.safetensors")
    assert code == 2 and "identical" in err and not (tmp_path / "x.safetensors").exists()
    code, _, err = run_cli(capsys, "extract", "--base", tiny_sd15_path, "--tuned", tmp_path / "nope",
                           "--out", tmp_path / "x.safetensors")
    assert code == 2 and "does not exist" in err

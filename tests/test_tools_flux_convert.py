"""`lokr-diffusion convert --to <layout>` between the six Flux.1 file layouts of the DiT spec.

Every output is checked twice, independently of the converter's own per-layer check: its keys
against the layout's key rule restated in test_flux_layouts, and its effect by loading it into a
tiny FluxTransformer2DModel and comparing every layer with the restated math (W + scale * dW).
Stacked modules are also checked tensor by tensor (lora_down rows concatenated, lora_up
block-diagonal, alpha).
"""
import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file, save_file

from lokr_diffusion.families.flux import FLUX_DEV
from lokr_diffusion.loading import load_network
from lokr_diffusion.tools.convert import convert_adapter

from .test_flux_layouts import LAYOUTS, ORIGINAL, SWAPPED, TINY, _factors, _linears, _state, make_file
from .test_tools_helpers import run_cli, run_json

NAMES = {"lycoris": "lycoris", "lora_transformer": "lora_transformer", "transformer-dotted": "transformer",
         "bare-dotted": "bare", "kohya": "kohya", "diffusion_model-dotted": "diffusion_model"}
LAYOUT_OF = {v: k for k, v in NAMES.items()}
H = 32


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return FluxTransformer2DModel(**TINY).eval().requires_grad_(False)


def expected_keys(model, target):
    """The module keys a whole-model file has in `target`, by the restated key rule."""
    key_of, original = LAYOUTS[LAYOUT_OF[target]]
    names = list(ORIGINAL) + list(SWAPPED) if original else list(_linears(model))
    return {key_of(n) for n in names}


def module_keys(path):
    from lokr_diffusion.tools.adapterfile import split_file_key

    return {split_file_key(k)[0] for k in load_file(path)}


def assert_loads_as(model, path, expected, tol=1e-5):
    """The file, loaded and merged into the model, gives every layer W + dW (and nothing else)."""
    original = _state(model)
    network, report = load_network(path, unet=model, family=FLUX_DEV, strict=True)
    assert not report.unmatched
    network.merge()
    try:
        for name, layer in _linears(model).items():
            w0 = original[f"{name}.weight"]
            if name not in expected:
                assert torch.equal(layer.weight, w0), name
                continue
            ref = w0 + expected[name]
            assert float((layer.weight - ref).norm() / ref.norm()) <= tol, name
    finally:
        network.unmerge()
        network.remove()
    model.load_state_dict(original)


@pytest.mark.parametrize("source", sorted(LAYOUTS))
def test_lora_between_every_pair_of_layouts(model, tmp_path, source):
    """LoRA: rename between Diffusers names, stack into qkv / linear1 / the final modulation, split
    back out; every target's layers get exactly the source's updates."""
    src = tmp_path / "in.safetensors"
    expected = make_file(model, source, "lora", src)
    for target in NAMES.values():
        out = tmp_path / f"{target}.safetensors"
        r = convert_adapter(src, out, to=target)
        assert r["layout"] == target and r["max_rel_diff"] <= 1e-6 and not r["unmatched"]
        assert module_keys(out) == expected_keys(model, target), target
        into_original, from_original = LAYOUTS[LAYOUT_OF[target]][1], LAYOUTS[source][1]
        assert r["stacked"] == (4 if into_original and not from_original else 0)  # img/txt qkv, linear1, final
        assert r["split"] == (4 if from_original and not into_original else 0)
        assert_loads_as(model, out, expected)


@pytest.mark.parametrize("algo", ["lokr", "lokr-both-lowrank", "loha"])
def test_lokr_and_loha_rename_between_diffusers_layouts(model, tmp_path, algo):
    src = tmp_path / "in.safetensors"
    expected = make_file(model, "lycoris", algo, src)
    for target in ("lora_transformer", "transformer", "bare"):
        out = tmp_path / f"{target}.safetensors"
        r = convert_adapter(src, out, to=target)
        assert r["renamed"] == 30 and r["max_rel_diff"] == 0.0
        assert module_keys(out) == expected_keys(model, target)
        before, after = load_file(src), load_file(out)
        assert sorted(t.shape for t in before.values()) == sorted(t.shape for t in after.values())  # renamed only
        assert_loads_as(model, out, expected)


@pytest.mark.parametrize("algo", ["lokr", "loha"])
def test_kronecker_and_hadamard_products_are_not_stacked(capsys, model, tmp_path, algo):
    src = tmp_path / "in.safetensors"
    make_file(model, "transformer-dotted", algo, src)
    for target in ("kohya", "diffusion_model"):
        out = tmp_path / f"{target}.safetensors"
        code, _, err = run_cli(capsys, "convert", src, out, "--to", target)
        assert code == 2 and not out.exists()
        assert f"({algo}) cannot become the one module" in err and "only LoRA stacks" in err
        assert "Kronecker (LoKr) or Hadamard (LoHa) products" in err and "lycoris, lora_transformer" in err


def test_loha_over_fused_layers_splits(model, tmp_path):
    src = tmp_path / "in.safetensors"
    expected = make_file(model, "kohya", "loha", src)
    r = convert_adapter(src, tmp_path / "out.safetensors", to="lycoris")
    assert r["split"] == 4 and r["max_rel_diff"] == 0.0
    assert_loads_as(model, tmp_path / "out.safetensors", expected)


def _fused_lokr(a, g):
    """A kohya img_attn.qkv LoKr module (96 x 32) with w1 of `a` rows: w2 has 96 / a rows."""
    b = 3 * H // a
    return {"lokr_w1": torch.randn(a, 2, generator=g), "lokr_w2_a": torch.randn(b, 2, generator=g),
            "lokr_w2_b": torch.randn(2, 16, generator=g), "alpha": torch.tensor(1.5)}


def test_fused_lokr_splits_only_on_whole_w2_blocks(capsys, model, tmp_path):
    g = torch.Generator().manual_seed(7)
    key = "lora_unet_double_blocks_0_img_attn_qkv"
    aligned = _fused_lokr(6, g)  # w2 has 16 rows: q, k and v are 2 blocks each
    save_file({f"{key}.{n}": v for n, v in aligned.items()}, str(tmp_path / "a.safetensors"))
    r = run_json(capsys, "convert", tmp_path / "a.safetensors", tmp_path / "a_out.safetensors", "--to", "bare")
    assert r["split"] == 1 and r["max_rel_diff"] == 0.0
    out = load_file(tmp_path / "a_out.safetensors")
    assert out["transformer_blocks.0.attn.to_k.lokr_w1"].shape == (2, 2)
    dw = torch.kron(aligned["lokr_w1"], aligned["lokr_w2_a"] @ aligned["lokr_w2_b"]) * 1.5 / 2
    q, k, v = dw.split(H)
    assert_loads_as(model, tmp_path / "a_out.safetensors", {f"transformer_blocks.0.attn.to_{x}": d
                                                            for x, d in zip("qkv", (q, k, v))})
    unaligned = _fused_lokr(4, g)  # 24-row blocks: q ends in the middle of the second one
    save_file({f"{key}.{n}": v for n, v in unaligned.items()}, str(tmp_path / "u.safetensors"))
    code, _, err = run_cli(capsys, "convert", tmp_path / "u.safetensors", tmp_path / "u_out.safetensors",
                           "--to", "bare")
    assert code == 2 and "cut through blocks" in err and key in err and not (tmp_path / "u_out.safetensors").exists()


def _lora(out_dim, in_dim, rank, alpha, g):
    return {"lora_up.weight": torch.randn(out_dim, rank, generator=g) * 0.3,
            "lora_down.weight": torch.randn(rank, in_dim, generator=g) * 0.3, "alpha": torch.tensor(float(alpha))}


def _dw(t):
    up, down = t["lora_up.weight"].float(), t["lora_down.weight"].float()
    return up @ down * float(t["alpha"]) / down.shape[0]


@pytest.mark.parametrize("same_scale", [True, False])
def test_stacked_qkv_tensors(capsys, model, tmp_path, same_scale):
    """lora_down rows concatenated, lora_up block-diagonal; alpha / r kept when the members agree
    (factors bit for bit), folded into lora_up otherwise (alpha = the stack's rank)."""
    g = torch.Generator().manual_seed(8)
    ranks, alphas = ((2, 4, 3), (1.0, 2.0, 1.5)) if same_scale else ((2, 4, 3), (3.0, 1.0, 6.0))
    members = {x: _lora(H, H, r, a, g) for x, r, a in zip("qkv", ranks, alphas)}
    tensors = {f"lycoris_transformer_blocks_0_attn_to_{x}.{n}": v for x, t in members.items() for n, v in t.items()}
    save_file(tensors, str(tmp_path / "in.safetensors"))
    r = run_json(capsys, "convert", tmp_path / "in.safetensors", tmp_path / "out.safetensors", "--to", "kohya")
    assert (r["stacked"], r["rescaled"]) == (1, 0 if same_scale else 1)
    out = load_file(tmp_path / "out.safetensors")
    key = "lora_unet_double_blocks_0_img_attn_qkv"
    assert set(out) == {f"{key}.lora_up.weight", f"{key}.lora_down.weight", f"{key}.alpha"}
    up, down, alpha = out[f"{key}.lora_up.weight"], out[f"{key}.lora_down.weight"], float(out[f"{key}.alpha"])
    assert up.shape == (3 * H, 9) and down.shape == (9, H)
    assert torch.equal(down, torch.cat([members[x]["lora_down.weight"] for x in "qkv"]))
    col = 0
    for i, x in enumerate("qkv"):
        rows, r_x = slice(i * H, (i + 1) * H), ranks[i]
        block = up[rows, col:col + r_x]
        if same_scale:
            assert torch.equal(block, members[x]["lora_up.weight"])
        else:
            assert torch.allclose(block, members[x]["lora_up.weight"] * alphas[i] / r_x)
        assert not up[rows, :col].any() and not up[rows, col + r_x:].any()  # block-diagonal
        col += r_x
    assert alpha == (0.5 * 9 if same_scale else 9.0)  # the common alpha / r kept, or scale 1 once folded
    expected = {f"transformer_blocks.0.attn.to_{x}": _dw(members[x]) for x in "qkv"}
    assert_loads_as(model, tmp_path / "out.safetensors", expected)


def test_stacking_keeps_a_non_unit_common_scale(capsys, model, tmp_path):
    g = torch.Generator().manual_seed(9)
    members = {x: _lora(H, H, 2, 3.0, g) for x in "qkv"}  # every member alpha / r = 1.5
    save_file({f"transformer.transformer_blocks.0.attn.add_{x}_proj.{n}": v for x, t in members.items()
               for n, v in t.items()}, str(tmp_path / "in.safetensors"))
    r = run_json(capsys, "convert", tmp_path / "in.safetensors", tmp_path / "out.safetensors", "--to",
                 "diffusion_model")
    assert r["rescaled"] == 0
    out = load_file(tmp_path / "out.safetensors")
    assert float(out["diffusion_model.double_blocks.0.txt_attn.qkv.alpha"]) == 1.5 * 6
    assert_loads_as(model, tmp_path / "out.safetensors",
                    {f"transformer_blocks.0.attn.add_{x}_proj": _dw(members[x]) for x in "qkv"})


def test_layers_the_file_does_not_patch_get_zero_rows(capsys, model, tmp_path):
    """attn-only trains the single block's q/k/v but not proj_mlp: linear1 gets zero MLP rows."""
    g = torch.Generator().manual_seed(10)
    members = {x: _lora(H, H, 2, 2.0, g) for x in "qkv"}
    save_file({f"single_transformer_blocks.0.attn.to_{x}.{n}": v for x, t in members.items() for n, v in t.items()},
              str(tmp_path / "in.safetensors"))
    run_json(capsys, "convert", tmp_path / "in.safetensors", tmp_path / "out.safetensors", "--to", "kohya")
    out = load_file(tmp_path / "out.safetensors")
    up = out["lora_unet_single_blocks_0_linear1.lora_up.weight"]
    assert up.shape == (7 * H, 6) and not up[3 * H:].any()
    assert_loads_as(model, tmp_path / "out.safetensors",
                    {f"single_transformer_blocks.0.attn.to_{x}": _dw(members[x]) for x in "qkv"})


def test_final_modulation_moves_any_algorithm(capsys, model, tmp_path):
    """norm_out.linear <-> final_layer.adaLN_modulation.1 (halves swapped): one layer, rows reordered."""
    g = torch.Generator().manual_seed(11)
    t = _factors("lokr-lowrank", 2 * H, H, g)  # w1 4 rows: 16-row blocks, the halves are whole blocks
    save_file({f"lycoris_norm_out_linear.{n}": v for n, v in t.items()}, str(tmp_path / "in.safetensors"))
    r = run_json(capsys, "convert", tmp_path / "in.safetensors", tmp_path / "out.safetensors", "--to", "kohya")
    assert r["stacked"] == 1 and r["max_rel_diff"] == 0.0
    out = load_file(tmp_path / "out.safetensors")
    w1 = out["lora_unet_final_layer_adaLN_modulation_1.lokr_w1"]
    assert torch.equal(w1, torch.cat([t["lokr_w1"][2:], t["lokr_w1"][:2]]))
    from .test_flux_layouts import reference_delta

    assert_loads_as(model, tmp_path / "out.safetensors", {"norm_out.linear": reference_delta(t)})
    back = run_json(capsys, "convert", tmp_path / "out.safetensors", tmp_path / "back.safetensors", "--to", "lycoris")
    assert back["split"] == 1
    assert torch.equal(load_file(tmp_path / "back.safetensors")["lycoris_norm_out_linear.lokr_w1"], t["lokr_w1"])


def test_round_trip_and_bf16(capsys, model, tmp_path):
    g = torch.Generator().manual_seed(12)
    members = {x: _lora(H, H, 2, a, g) for x, a in zip("qkv", (1.0, 2.0, 4.0))}
    save_file({f"lycoris_transformer_blocks_0_attn_to_{x}.{n}": v for x, t in members.items() for n, v in t.items()},
              str(tmp_path / "in.safetensors"))
    expected = {f"transformer_blocks.0.attn.to_{x}": _dw(members[x]) for x in "qkv"}
    run_json(capsys, "convert", tmp_path / "in.safetensors", tmp_path / "k.safetensors", "--to", "kohya")
    back = run_json(capsys, "convert", tmp_path / "k.safetensors", tmp_path / "back.safetensors", "--to", "lycoris")
    assert back["split"] == 1
    assert_loads_as(model, tmp_path / "back.safetensors", expected)
    r = run_json(capsys, "convert", tmp_path / "in.safetensors", tmp_path / "b.safetensors", "--to", "kohya",
                 "--dtype", "bf16")
    assert 0 < r["max_rel_diff"] < 1.6e-2  # alpha / r folded into bf16 lora_up: rounding, within the check
    assert load_file(tmp_path / "b.safetensors")["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"].dtype \
        == torch.bfloat16
    assert_loads_as(model, tmp_path / "b.safetensors", expected, tol=1.6e-2)


def test_text_encoder_keys_and_metadata(capsys, model, tmp_path):
    g = torch.Generator().manual_seed(13)
    t = {f"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.{n}": v
         for n, v in _factors("lora", 32, 32, g).items()}
    t.update({f"lora_te2_encoder_block_0_layer_0_SelfAttention_q.{n}": v
              for n, v in _factors("lora", 32, 32, g).items()})
    t.update({f"lycoris_proj_out.{n}": v for n, v in _factors("lora", 64, 32, g).items()})
    save_file(t, str(tmp_path / "in.safetensors"), {"modelspec.architecture": "flux-1-dev/lora",
                                                    "modelspec.implementation": "diffusers"})
    r = run_json(capsys, "convert", tmp_path / "in.safetensors", tmp_path / "out.safetensors", "--to", "kohya")
    assert r["family"] == "flux" and r["renamed"] == 1
    assert module_keys(tmp_path / "out.safetensors") == {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_encoder_block_0_layer_0_SelfAttention_q",
        "lora_unet_final_layer_linear"}
    meta = run_json(capsys, "inspect", tmp_path / "out.safetensors")["metadata"]
    assert meta["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"  # sd-scripts' original names
    run_json(capsys, "convert", tmp_path / "out.safetensors", tmp_path / "again.safetensors", "--to", "transformer")
    assert run_json(capsys, "inspect", tmp_path / "again.safetensors")["metadata"]["modelspec.implementation"] \
        == "diffusers"


def test_cli_names_the_layouts_and_refuses_them_for_sd(capsys, tiny_sd15_path, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        run_cli(capsys, "convert", "--help")
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    for name in NAMES.values():
        assert f"{name} =" in " ".join(out.split())
    from .helpers import load_components
    from .test_tools_helpers import make_adapter

    make_adapter(*load_components(tiny_sd15_path), tmp_path / "sd.safetensors", algo="lora", preset="attn-only", dim=2)
    code, _, err = run_cli(capsys, "convert", tmp_path / "sd.safetensors", tmp_path / "o.safetensors", "--to", "kohya")
    assert code == 2 and "--to kohya is a file layout of " in err and "Flux.1" in err and "lycoris or peft" in err
    with pytest.raises(SystemExit) as exit_:
        run_cli(capsys, "convert", tmp_path / "sd.safetensors", tmp_path / "o.safetensors", "--to", "nope")
    assert exit_.value.code == 2 and "choose from 'lycoris', 'peft', 'lora_transformer'" in capsys.readouterr().err


def test_flux_peft_folders_are_refused_with_the_reason(capsys, tmp_path):
    import json

    g = torch.Generator().manual_seed(14)
    folder = tmp_path / "peft"
    folder.mkdir()
    save_file({"base_model.model.transformer_blocks.0.attn.to_q.lokr_w1": torch.randn(4, 4, generator=g),
               "base_model.model.transformer_blocks.0.attn.to_q.lokr_w2": torch.randn(8, 8, generator=g)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LOKR", "r": 8, "alpha": 8,
                                                            "target_modules": ["to_q"], "decompose_factor": 4}))
    code, _, err = run_cli(capsys, "convert", folder, tmp_path / "o.safetensors", "--family", "flux")
    assert code == 2 and "a PEFT folder of a Flux.1 [dev] model cannot be converted yet" in err
    assert not (tmp_path / "o.safetensors").exists()

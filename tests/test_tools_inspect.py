"""`lokr-diffusion inspect`: facts and compatibility warnings, from the file alone."""
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lokr_diffusion.tools.adapterfile import group_modules
from lokr_diffusion.tools.keymap import alias_table

from .helpers import load_components
from .test_tools_helpers import make_adapter, rewrite, run_cli, run_json

CONFIGS = {
    "lokr": dict(algo="lokr", preset="full", factor=4, dim=2, conv_dim=2),
    "loha": dict(algo="loha", preset="attn-mlp", dim=2),
    "lora": dict(algo="lora", preset="full", dim=3, alpha=1.5, conv_dim=2),
}


@pytest.fixture(scope="module")
def files(tiny_sd15_path, tiny_sdxl_path, tmp_path_factory):
    """(family, algo) -> (path, module keys, parameters) for files written by create_network + save."""
    folder = tmp_path_factory.mktemp("inspect")
    out = {}
    for family, model in (("sd1", tiny_sd15_path), ("sdxl", tiny_sdxl_path)):
        unet, tes = load_components(model)
        for algo, cfg in CONFIGS.items():
            path = folder / f"{family}_{algo}.safetensors"
            out[family, algo] = (path, *make_adapter(unet, tes, path, dtype=torch.float16, **cfg))
    return out


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("algo", sorted(CONFIGS))
def test_json_facts_of_our_files(capsys, files, family, algo):
    path, keys, params = files[family, algo]
    r = run_json(capsys, "inspect", path)
    assert r["family"] == family and r["layout"] == "lycoris"
    assert r["algorithms"] == {algo: len(keys)}
    assert r["parameters"] == params and sum(r["parameters_per_component"].values()) == params
    assert r["file_size"] == os.path.getsize(path)
    expected_components = {"unet", "te"} if family == "sd1" else {"unet", "te1", "te2"}
    assert set(r["components"]) == expected_components
    assert sum(r["components"].values()) == len(keys)
    assert sum(n for blocks in r["blocks"].values() for n in blocks.values()) == len(keys)
    assert r["dtypes"] == {"float16": sum(len(m["tensors"]) for m in r["modules"])}
    assert r["alpha_dtypes"] == {"float32": len(keys)}
    assert r["warnings"] == []
    assert r["metadata"]["ss_network_module"] == "lycoris.kohya"
    assert r["network"]["args"]["algo"] == algo
    tensors = load_file(path)
    for m in r["modules"]:
        for name, shape in m["tensors"].items():
            assert list(tensors[f"{m['key']}.{name}"].shape) == shape
        assert m["alpha"] == float(tensors[f"{m['key']}.alpha"])
        if algo == "lokr":
            f = m["factors"]
            w1 = tensors[f"{m['key']}.lokr_w1"].shape
            assert f["w1"] == list(w1)
            assert f["w1"][0] * f["w2"][0] == m["weight_shape"][0]
            assert f["w2_low_rank"] == (m["rank"] is not None)
    if family == "sdxl":
        blocks = r["blocks"]["unet"]
        assert "input_blocks.4" in blocks and "middle_block" in blocks  # ldm block names


def test_text_output(capsys, files):
    code, out, _ = run_cli(capsys, "inspect", files["sdxl", "lokr"][0])
    assert code == 0
    assert "family:      SDXL" in out and "UNet" in out and "TE2" in out
    assert "LoKr factors" in out and "modules per block:" in out and "ss_network_args" in out
    assert "no warnings" in out


@pytest.mark.parametrize("tensors,shown", [
    ({"emb_params": torch.zeros(2, 32)}, "emb_params 2 x 32"),
    ({"clip_l": torch.zeros(3, 32), "clip_g": torch.zeros(3, 64)}, "clip_g 3 x 64, clip_l 3 x 32"),
])
def test_trigger_embedding_files_are_described(capsys, tmp_path, tensors, shown):
    path = tmp_path / "run_emb.safetensors"
    save_file(tensors, str(path), {"trigger": "zqv"})
    code, out, _ = run_cli(capsys, "inspect", str(path))
    assert code == 0
    assert "trigger embedding" in out and "trigger:     zqv" in out and f"vectors:     {shown}" in out
    r = run_json(capsys, "inspect", str(path))
    assert r["layout"] == "embedding" and r["trigger"] == "zqv"


def _first(tensors, suffix):
    return next(k.rsplit(".", 1)[0] for k in tensors if k.endswith(suffix))


def _tucker(t):
    """Replace one low-rank conv module by a Tucker one (t2 core, transposed w2_a)."""
    mod = next(k.rsplit(".", 1)[0] for k, v in t.items() if k.endswith("lokr_w2_b") and "conv1" in k)
    w2_a, w2_b = t.pop(f"{mod}.lokr_w2_a"), t.pop(f"{mod}.lokr_w2_b")
    r, b, d = w2_b.shape[0], w2_a.shape[0], w2_b.shape[1] // 9
    t[f"{mod}.lokr_t2"] = torch.randn(r, r, 3, 3, dtype=w2_a.dtype)
    t[f"{mod}.lokr_w2_a"] = torch.randn(r, b, dtype=w2_a.dtype)
    t[f"{mod}.lokr_w2_b"] = torch.randn(r, d, dtype=w2_a.dtype)
    return t


def _dora(t):
    mod = _first(t, "lokr_w1")
    t[f"{mod}.dora_scale"] = torch.ones(group_modules(t)[mod].flat_shape()[0], 1)  # one magnitude per output row
    return t


def _no_alpha(t):
    del t[f"{_first(t, 'lokr_w1')}.alpha"]
    return t


def _no_text_model(t):
    return {k.replace("lora_te_text_model_", "lora_te_"): v for k, v in t.items()}


def _half_attention(t):
    return {k: v for k, v in t.items() if "encoder_layers_0_self_attn_q_proj" not in k}


@pytest.mark.parametrize("edit, code", [
    (_tucker, "tucker"), (_dora, "dora_scale"), (_no_alpha, "missing_alpha"),
    (_no_text_model, "te_without_text_model"), (_half_attention, "partial_te_attention"),
])
def test_warnings_on_crafted_files(capsys, files, tmp_path, edit, code):
    path = rewrite(files["sd1", "lokr"][0], tmp_path / "variant.safetensors", edit)
    r = run_json(capsys, "inspect", path)
    assert [w["code"] for w in r["warnings"]] == [code]
    warning = r["warnings"][0]
    assert warning["message"]
    if code != "partial_te_attention":
        assert warning["count"] >= 1 and warning["modules"]
    text = run_cli(capsys, "inspect", path)[1]
    assert f"[{code}]" in text


def test_sdxl_diffusers_names_and_alpha_not_rank(capsys, tiny_sdxl_path, tmp_path):
    unet, tes = load_components(tiny_sdxl_path)
    src = tmp_path / "full.safetensors"
    make_adapter(unet, tes, src, preset="attn-only", factor=4, dim=10000)  # both factors full: alpha = dim
    r = run_json(capsys, "inspect", src)
    assert r["warnings"] == [] and r["ranks"] == {"full": sum(r["components"].values())}
    paths = {canon: "lora_unet_" + target.path.replace(".", "_")
             for _, (target, canon) in alias_table("sdxl").items() if target.component == "unet"}

    def diffusers_names(t):
        return {(paths[k.split(".")[0]] + "." + k.split(".", 1)[1]) if k.startswith("lora_unet_") else k: v
                for k, v in t.items()}

    r = run_json(capsys, "inspect", rewrite(src, tmp_path / "diffusers.safetensors", diffusers_names))
    assert r["family"] == "sdxl"
    assert [w["code"] for w in r["warnings"]] == ["sdxl_diffusers_names"]
    assert r["warnings"][0]["count"] == r["components"]["unet"]

    def odd_alpha(t):
        t[f"{_first(t, 'lokr_w1')}.alpha"] = torch.tensor(4.0)
        return t

    r = run_json(capsys, "inspect", rewrite(src, tmp_path / "alpha.safetensors", odd_alpha))
    assert [(w["code"], w["count"]) for w in r["warnings"]] == [("alpha_not_rank", 1)]


@pytest.mark.parametrize("width, family", [(768, "sd1"), (1024, "sd2"), (2048, "sdxl")])
def test_family_from_key_widths_without_metadata(capsys, tmp_path, width, family):
    prefix = "lora_unet_input_blocks_4_1" if family == "sdxl" else "lora_unet_down_blocks_1_attentions_0"
    key = f"{prefix}_transformer_blocks_0_attn2_to_k"
    path = tmp_path / "bare.safetensors"
    save_file({f"{key}.lokr_w1": torch.ones(8, 8), f"{key}.lokr_w2": torch.ones(80, width // 8),
               f"{key}.alpha": torch.tensor(4.0)}, str(path))
    r = run_json(capsys, "inspect", path)
    assert (r["family"], r["family_source"]) == (family, "keys (cross-attention width)")
    assert r["metadata"] == {} and r["modules"][0]["weight_shape"] == [640, width]


def test_bad_input_is_one_line_exit_2(capsys, tmp_path):
    code, _, err = run_cli(capsys, "inspect", tmp_path / "missing.safetensors")
    assert code == 2 and "no such file" in err and len(err.strip().splitlines()) == 1
    junk = tmp_path / "junk.safetensors"
    junk.write_text("this is not a safetensors file at all")
    code, _, err = run_cli(capsys, "inspect", junk)
    assert code == 2 and "not a safetensors file" in err and len(err.strip().splitlines()) == 1
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04junk")
    code, _, err = run_cli(capsys, "inspect", pickle)
    assert code == 2 and "pickle" in err
    code, _, err = run_cli(capsys, "inspect", tmp_path)
    assert code == 2 and "PEFT" in err

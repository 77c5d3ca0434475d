"""Saving in the safe profile, loading every accepted variant, and clear errors for bad files."""
import json
import logging
import os
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from lokr_diffusion import AdapterConfig, AdapterFileError, create_network, load_network, read_safetensors
from lokr_diffusion.fileformat import tensor_hash
from lokr_diffusion.naming import diffusers_to_ldm, unet_layout

from .helpers import load_components


@pytest.fixture(scope="module")
def sd15(tiny_sd15_path):
    return load_components(tiny_sd15_path)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_path):
    return load_components(tiny_sdxl_path)


def _trained(unet, tes, seed=0, **cfg):
    net = create_network(AdapterConfig(**cfg), unet=unet, text_encoders=tes)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net


def _deltas(net):
    return {a.key: a.delta_weight().detach() * a.multiplier for a in net.adapters()}


@pytest.fixture
def saved(sd15, tmp_path):
    unet, tes = sd15
    net = _trained(unet, tes, preset="full", factor=8, dim=4, alpha=2.0, conv_dim=4, conv_alpha=1.0)
    path = net.save(tmp_path / "a.safetensors", dtype=torch.float32)
    deltas = _deltas(net)
    net.remove()
    return path, deltas


def test_safe_profile_layout_and_metadata(sd15, tmp_path):
    unet, tes = sd15
    net = _trained(unet, tes, preset="full", factor=8, dim=4, conv_dim=4)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        path = net.save(tmp_path / f"x_{dtype}.safetensors", dtype=dtype)
        sd = load_file(path)
        alphas = {k: v for k, v in sd.items() if k.endswith(".alpha")}
        assert len(alphas) == len(net.module_keys())
        assert all(v.dtype == torch.float32 and v.dim() == 0 for v in alphas.values())
        assert all(v.dtype == dtype for k, v in sd.items() if not k.endswith(".alpha"))
        assert not any(k.endswith((".lokr_t2", ".dora_scale", ".scale", ".bias")) for k in sd)
    _, meta = read_safetensors(path)
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_v2"] == "False" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(meta["ss_network_args"])["algo"] == "lokr" and json.loads(meta["ss_network_args"])["factor"] == "8"
    assert meta["sshs_model_hash"] == tensor_hash(path.read_bytes())
    for key in ("modelspec.sai_model_spec", "modelspec.title", "modelspec.date", "modelspec.resolution",
                "modelspec.prediction_type", "modelspec.implementation", "ss_network_dim", "ss_network_alpha"):
        assert key in meta, key
    net.remove()


def test_alpha_is_rank_when_both_factors_full(sd15, tmp_path):
    unet, tes = sd15
    net = _trained(unet, tes, preset="attn-only", factor=4, dim=6, alpha=1.0, full_matrix=True)
    sd = load_file(net.save(tmp_path / "f.safetensors"))
    assert {float(v) for k, v in sd.items() if k.endswith(".alpha")} == {6.0}
    assert all(a.scale == 1.0 for a in net.adapters())
    net.remove()


def test_round_trip_same_weights(saved, sd15):
    path, deltas = saved
    unet, tes = sd15
    net, report = load_network(path, unet=unet, text_encoders=tes, strict=True)
    assert report.patched["unet"] + report.patched["te"] == len(deltas) and not report.unmatched
    for key, d in _deltas(net).items():
        assert torch.allclose(d, deltas[key], atol=1e-6), key
    net.remove()


def test_sdxl_names_both_styles(sdxl, tmp_path):
    unet, tes = sdxl
    net = _trained(unet, tes, preset="attn-mlp", factor=4, dim=2)
    path = net.save(tmp_path / "ldm.safetensors", dtype=torch.float32)
    deltas = _deltas(net)
    net.remove()
    sd = load_file(path)
    assert any(k.startswith("lora_unet_input_blocks_") for k in sd)
    # rewrite the UNet keys to diffusers style (what some trainers write) and TE keys without text_model_
    layout = unet_layout(unet)
    ldm_to_diff = {}
    for name, _ in unet.named_modules():
        ldm = diffusers_to_ldm(name, *layout)
        if ldm:
            ldm_to_diff["lora_unet_" + ldm.replace(".", "_")] = "lora_unet_" + name.replace(".", "_")
    renamed = {}
    for k, v in sd.items():
        mod, _, t = k.partition(".")
        mod = ldm_to_diff.get(mod, mod).replace("_text_model_", "_")
        renamed[f"{mod}.{t}"] = v
    assert any(k.startswith("lora_unet_down_blocks_") for k in renamed) and not any("text_model" in k for k in renamed)
    net2, report = load_network(renamed, unet=unet, text_encoders=tes, strict=True)
    assert set(report.patched) == {"unet", "te1", "te2"}
    got = _deltas(net2)
    assert set(got) == set(deltas)  # written back under the canonical (ldm, text_model_) keys
    for k in deltas:
        assert torch.allclose(got[k], deltas[k], atol=1e-6), k
    net2.remove()


def test_other_prefixes_and_tucker(sd15):
    unet, tes = sd15
    to_q = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    out_dim, in_dim = to_q.weight.shape
    conv = unet.down_blocks[0].resnets[0].conv1
    co, ci = conv.weight.shape[:2]
    r = 2
    sd = {
        "lycoris_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lokr_w1": torch.randn(2, 2),
        "lycoris_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lokr_w2": torch.randn(out_dim // 2, in_dim // 2),
        "lycoris_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(1.0),
        # Tucker LoKr on a 3x3 conv: w2_a (r, b), w2_b (r, d), t2 (r, r, 3, 3)
        "lora_unet_down_blocks_0_resnets_0_conv1.lokr_w1": torch.randn(2, 2),
        "lora_unet_down_blocks_0_resnets_0_conv1.lokr_t2": torch.randn(r, r, 3, 3),
        "lora_unet_down_blocks_0_resnets_0_conv1.lokr_w2_a": torch.randn(r, co // 2),
        "lora_unet_down_blocks_0_resnets_0_conv1.lokr_w2_b": torch.randn(r, ci // 2),
        "lora_unet_down_blocks_0_resnets_0_conv1.alpha": torch.tensor(1.0),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(r, tes[0].config.hidden_size),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(tes[0].config.hidden_size, r),
    }
    net, report = load_network(sd, unet=unet, text_encoders=tes, strict=True)
    assert report.algorithms == {"lokr": 2, "lora": 1}
    tucker = net.adapter("lora_unet_down_blocks_0_resnets_0_conv1")
    w2 = torch.einsum("ijkl,ip,jq->pqkl", sd["lora_unet_down_blocks_0_resnets_0_conv1.lokr_t2"],
                      sd["lora_unet_down_blocks_0_resnets_0_conv1.lokr_w2_a"], sd["lora_unet_down_blocks_0_resnets_0_conv1.lokr_w2_b"])
    ref = torch.kron(sd["lora_unet_down_blocks_0_resnets_0_conv1.lokr_w1"][:, :, None, None], w2.contiguous()) * (1.0 / r)
    assert torch.allclose(tucker.delta_weight(), ref, atol=1e-5)
    te_mod = net.adapter("lora_te_text_model_encoder_layers_0_self_attn_q_proj")
    assert te_mod.scale == 1.0  # no alpha: scale 1, as the UIs do
    net.remove()


# -- bad input ----------------------------------------------------------------------------------

def _write_bad(tmp_path, name, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _header_file(tmp_path, header: dict, payload=b""):
    raw = json.dumps(header).encode()
    return _write_bad(tmp_path, "h.safetensors", struct.pack("<Q", len(raw)) + raw + payload)


@pytest.mark.parametrize("maker,needle", [
    (lambda t: _write_bad(t, "r.safetensors", os.urandom(4096)), "not a safetensors file"),
    (lambda t: _write_bad(t, "e.safetensors", b""), "not a safetensors file"),
    (lambda t: _write_bad(t, "n.safetensors", struct.pack("<Q", 10) + b"not json!!"), "header is not JSON"),
    (lambda t: _header_file(t, {"a.lokr_w1": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}), "points outside the file"),
    (lambda t: _header_file(t, {"__metadata__": {"x": 1}}), "metadata must map names to strings"),
    (lambda t: _header_file(t, {"a.lokr_w1": {"dtype": "F32"}}), "malformed header entry"),
    (lambda t: _write_bad(t, "m.ckpt", b"\x80\x04junk"), "pickles"),
    (lambda t: t / "missing.safetensors", "no such file"),
])
def test_unreadable_files(tmp_path, sd15, maker, needle):
    path = maker(tmp_path)
    unet, tes = sd15
    with pytest.raises(AdapterFileError, match=needle) as info:
        load_network(path, unet=unet, text_encoders=tes)
    assert str(path.name) in str(info.value)


def test_truncated_file(saved, tmp_path, sd15):
    path, _ = saved
    data = path.read_bytes()
    bad = _write_bad(tmp_path, "trunc.safetensors", data[: len(data) // 2])
    with pytest.raises(AdapterFileError, match="trunc.safetensors"):
        load_network(bad, unet=sd15[0], text_encoders=sd15[1])


def _file_with(tmp_path, saved_path, edit):
    sd = load_file(saved_path)
    edit(sd)
    p = tmp_path / "edited.safetensors"
    save_file(sd, p)
    return p


KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def test_shape_mismatch_names_module_expected_found(saved, tmp_path, sd15):
    def edit(sd):
        sd[f"{KEY}.lokr_w1"] = torch.randn(3, 3)
    p = _file_with(tmp_path, saved[0], edit)
    with pytest.raises(AdapterFileError, match=rf"{KEY}.*shape.*found lokr_w1 \(3, 3\)"):
        load_network(p, unet=sd15[0], text_encoders=sd15[1])


def test_missing_tensor(saved, tmp_path, sd15):
    def edit(sd):
        for k in [k for k in sd if k.startswith(KEY + ".lokr_w2")]:
            del sd[k]
    p = _file_with(tmp_path, saved[0], edit)
    with pytest.raises(AdapterFileError, match=rf"{KEY}.*missing tensor 'lokr_w2"):
        load_network(p, unet=sd15[0], text_encoders=sd15[1])


def test_non_finite_and_wrong_dtype(saved, tmp_path, sd15):
    def nan(sd):
        sd[f"{KEY}.lokr_w1"][0, 0] = float("nan")
    with pytest.raises(AdapterFileError, match=rf"{KEY}.*non-finite"):
        load_network(_file_with(tmp_path, saved[0], nan), unet=sd15[0], text_encoders=sd15[1])

    def ints(sd):
        sd[f"{KEY}.lokr_w1"] = sd[f"{KEY}.lokr_w1"].to(torch.int32)
    with pytest.raises(AdapterFileError, match=rf"{KEY}.*dtype torch.int32"):
        load_network(_file_with(tmp_path, saved[0], ints), unet=sd15[0], text_encoders=sd15[1])


def test_unmatched_keys_strict_and_lenient(saved, tmp_path, sd15, caplog):
    def edit(sd):
        sd["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_qq.lokr_w1"] = sd[f"{KEY}.lokr_w1"].clone()
    p = _file_with(tmp_path, saved[0], edit)
    with pytest.raises(AdapterFileError, match=r"to_qq \(closest: " + KEY):
        load_network(p, unet=sd15[0], text_encoders=sd15[1], strict=True)
    with caplog.at_level(logging.WARNING):
        net, report = load_network(p, unet=sd15[0], text_encoders=sd15[1], strict=False)
    assert report.unmatched == ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_qq"]
    assert "match no module" in caplog.text
    net.remove()


def test_family_mismatch_and_dora(saved, tmp_path, sd15, sdxl):
    with pytest.raises(AdapterFileError, match="for SD 1.x or SD 2.x, but the model is SDXL"):
        load_network(saved[0], unet=sdxl[0], text_encoders=sdxl[1])

    def dora(sd):  # a DoRA magnitude must give one value per output row or input column
        sd[f"{KEY}.dora_scale"] = torch.ones(3, 3)
    with pytest.raises(AdapterFileError, match=rf"{KEY}: DoRA magnitude dora_scale of shape \(3, 3\) fits neither"):
        load_network(_file_with(tmp_path, saved[0], dora), unet=sd15[0], text_encoders=sd15[1])


def test_nothing_attached_after_an_error(saved, tmp_path, sd15):
    unet, tes = sd15
    x = torch.randn(1, unet.config.in_channels, 8, 8)
    ctx = torch.randn(1, 4, unet.config.cross_attention_dim)
    with torch.no_grad():
        before = unet(x, 5, encoder_hidden_states=ctx).sample

    def edit(sd):
        sd["lora_unet_up_blocks_1_attentions_0_proj_in.lokr_w1"] = torch.randn(5, 5)
    with pytest.raises(AdapterFileError):
        load_network(_file_with(tmp_path, saved[0], edit), unet=unet, text_encoders=tes)
    with torch.no_grad():
        assert torch.equal(unet(x, 5, encoder_hidden_states=ctx).sample, before)


def test_atomic_save_keeps_previous_file(sd15, tmp_path, monkeypatch):
    unet, tes = sd15
    net = _trained(unet, tes, preset="attn-only", dim=2)
    path = net.save(tmp_path / "keep.safetensors")
    before = path.read_bytes()
    with torch.no_grad():
        next(iter(net.parameters())).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        net.save(path)
    with torch.no_grad():
        next(iter(net.parameters())).fill_(0.5)

    def fail(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        net.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["keep.safetensors"]  # no temp file left
    net.remove()

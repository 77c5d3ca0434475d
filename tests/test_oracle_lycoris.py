"""lycoris-lora (PyPI) as the oracle: our files load there with the same effective weights, and
files it writes load here with the same outputs as its forward.

LyCORIS 4.1.3's loader does not read the factor shapes; it guesses a factor from them and
rebuilds the module from that guess (the format spec's section 5 documents this weakness;
ComfyUI and A1111 read shapes directly). The guess is right when w1 is the balanced
(factor -1) split, except for convolutions with a low-rank w2, where it takes the
kernel-flattened w2_b width for the input size. The test allows a LyCORIS failure only in
those two documented cases and requires every other module to match.
"""
import copy

import pytest
import torch
from torch import nn

lycoris_kohya = pytest.importorskip("lycoris.kohya")

from lokr_diffusion import AdapterConfig, create_network, factorization, load_network  # noqa: E402
from lokr_diffusion.naming import diffusers_to_ldm, unet_layout  # noqa: E402

from .helpers import load_components  # noqa: E402


def _view(named: dict[str, nn.Module]) -> nn.Module:
    """A container whose named_modules() lists the given modules under the given dotted paths."""
    root = nn.Module()
    for path, module in named.items():
        owner = root
        parts = path.split(".")
        for p in parts[:-1]:
            if not hasattr(owner, p):
                owner.add_module(p, nn.Module())
            owner = getattr(owner, p)
        owner.add_module(parts[-1], module)
    return root


def _kohya_views(unet, tes, sdxl):
    """sd-scripts' module trees: ldm names for the SDXL UNet, `text_model.` in every text encoder."""
    layout = unet_layout(unet)
    leaves = {n: m for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    if sdxl:
        leaves = {diffusers_to_ldm(n, *layout): m for n, m in leaves.items() if diffusers_to_ldm(n, *layout)}
    unet_view = _view(leaves)
    te_views = [te if hasattr(te, "text_model") else _view({"text_model": te}) for te in tes]
    return unet_view, te_views


def _randomize(network, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


VARIANTS = [(f, full, conv) for f in (-1, 4, 8, 16) for full in (False, True) for conv in (False, True)]


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_our_files_load_in_lycoris(family, request, tmp_path):
    path = request.getfixturevalue(f"tiny_{family}_path")
    unet, tes = load_components(path)
    sdxl = family == "sdxl"
    unet_view, te_views = _kohya_views(unet, tes, sdxl)
    compared = documented = 0
    for factor, full, conv in VARIANTS:
        cfg = AdapterConfig(algo="lokr", preset="full" if conv else "attn-mlp", factor=factor, dim=4, alpha=2.0,
                            conv_dim=4 if conv else None, conv_alpha=1.0, full_matrix=full)
        net = create_network(cfg, unet=unet, text_encoders=tes)
        _randomize(net, seed=factor + 17 * full + 5 * conv)
        file = tmp_path / f"ours_{factor}_{full}_{conv}.safetensors"
        net.save(file, dtype=torch.float32)
        kernels = {a.key: int(torch.tensor(a.base.weight.shape[2:]).prod()) if a.base.weight.dim() == 4 else 1
                   for a in net.adapters()}
        ours = {a.key: (a.delta_weight() * a.multiplier).detach() for a in net.adapters()}
        net.remove()
        from safetensors.torch import load_file
        sd = load_file(file)
        theirs = {}
        for key in ours:
            lyco_type, params = lycoris_kohya.get_module(sd, key)
            owner = _find(unet_view, te_views, key, sdxl)
            try:
                module = lycoris_kohya.make_module(lyco_type, params, key, owner)
            except (RuntimeError, AttributeError):
                assert _lycoris_cannot_guess(sd, key, kernels[key]), (key, factor, full, conv)
                documented += 1
                continue
            theirs[key] = module.get_weight(module.shape).detach()
        for key, w in theirs.items():
            rel = ((w - ours[key]).norm() / ours[key].norm().clamp_min(1e-12)).item()
            assert rel <= 1e-5, (family, factor, full, conv, key, rel)
            compared += 1
    assert compared > 100
    print(f"{family}: {compared} modules equal, {documented} documented LyCORIS loader failures")


def _lycoris_cannot_guess(sd, key, kernel):
    """The documented cases: w1 is not the balanced split, or a k x k conv with a low-rank w2."""
    w1 = sd[f"{key}.lokr_w1"]
    w2 = sd.get(f"{key}.lokr_w2")
    b, d = (w2.shape[0], w2.shape[1]) if w2 is not None else (sd[f"{key}.lokr_w2_a"].shape[0],
                                                                sd[f"{key}.lokr_w2_b"].shape[1] // kernel)
    out_dim, in_dim = w1.shape[0] * b, w1.shape[1] * d
    balanced = (factorization(out_dim, -1)[0], factorization(in_dim, -1)[0]) == tuple(w1.shape)
    return not balanced or (w2 is None and kernel > 1)


def _find(unet_view, te_views, key, sdxl):
    prefixes = [("lora_unet_", unet_view)]
    if len(te_views) == 1:
        prefixes.append(("lora_te_", te_views[0]))
    else:
        prefixes += [("lora_te1_", te_views[0]), ("lora_te2_", te_views[1])]
    for prefix, root in prefixes:
        if key.startswith(prefix):
            for name, m in root.named_modules():
                if f"{prefix}{name.replace('.', '_')}" == key:
                    return m
    raise KeyError(key)


def test_full_network_loads_through_lycoris_kohya_loader(tiny_sd15_path, tmp_path):
    """The whole-file entry point sd-scripts uses finds every module of our SD1.5 file."""
    unet, tes = load_components(tiny_sd15_path)
    net = create_network(AdapterConfig(preset="attn-mlp", factor=8, dim=4), unet=unet, text_encoders=tes)
    _randomize(net)
    file = tmp_path / "a.safetensors"
    net.save(file, dtype=torch.float32)
    n_ours = len(net.module_keys())
    net.remove()
    unet_view, te_views = _kohya_views(unet, tes, False)
    network, _ = lycoris_kohya.create_network_from_weights(1.0, str(file), None, te_views[0], unet_view)
    assert len(network.unet_loras) + len(network.text_encoder_loras) == n_ours


@pytest.mark.parametrize("algo,extra", [("lokr", {"factor": 4}), ("lokr", {"factor": -1, "full_matrix": True}),
                                        ("loha", {}), ("locon", {}),
                                        ("loha", {"use_scalar": True, "rs_lora": True})])
def test_lycoris_files_load_here(tiny_sd15_path, tmp_path, algo, extra):
    """A file LyCORIS writes (on a transformers-5 CLIP, so its TE keys lack text_model_) loads into
    our modules and the UNet/TE outputs equal LyCORIS's own forward."""
    unet, tes = load_components(tiny_sd15_path)
    te = tes[0]
    lyco_unet, lyco_te = copy.deepcopy(unet), copy.deepcopy(te)
    preset = tmp_path / "preset.toml"  # LyCORIS's "full" lists time_embedding twice on diffusers UNets
    preset.write_text('enable_conv = true\nunet_target_module = ["Transformer2DModel", "ResnetBlock2D", '
                      '"Downsample2D", "Upsample2D"]\nunet_target_name = ["conv_in", "conv_out"]\n'
                      'text_encoder_target_module = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]\n')
    network = lycoris_kohya.create_network(1.0, 4, 2.0, None, lyco_te, lyco_unet, algo=algo, conv_dim=4,
                                           conv_alpha=1.0, preset=str(preset), **extra)
    network.apply_to(lyco_te, lyco_unet, apply_text_encoder=True, apply_unet=True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    file = tmp_path / "lyco.safetensors"
    network.save_weights(str(file), torch.float32, {"ss_network_module": "lycoris.kohya"})

    ours, report = load_network(file, unet=unet, text_encoders=[te], strict=True)
    assert not report.unmatched
    assert sum(report.patched.values()) == len(network.unet_loras) + len(network.text_encoder_loras)
    sample = torch.randn(1, unet.config.in_channels, 8, 8)
    ids = torch.randint(0, te.config.vocab_size, (1, 12))
    with torch.no_grad():
        enc_ref = lyco_te(ids)[0]
        enc = te(ids)[0]
        assert torch.allclose(enc, enc_ref, rtol=1e-4, atol=1e-5)
        ref = lyco_unet(sample, 10, encoder_hidden_states=enc_ref).sample
        out = unet(sample, 10, encoder_hidden_states=enc).sample
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4), (out - ref).abs().max()


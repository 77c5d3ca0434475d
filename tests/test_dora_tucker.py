"""DoRA (`weight_decompose`, `dora_scale`) and Tucker (`use_tucker`) against LyCORIS 4.1.3.

Both directions on the same weights of two layers of the tiny SD1.5 UNet (a Linear and a 3x3
conv): a module LyCORIS builds and trains loads here with the same outputs and the same
gradients, and a file written here rebuilds in LyCORIS's loader (or, where that loader cannot
read LyCORIS's own layout, in a LyCORIS module given the state dict) with the same outputs.
The formulas ComfyUI and AUTOMATIC1111 apply to a `dora_scale` file are restated from their
code (docs/toolbox.md) and checked against ours where they agree.
"""
import copy

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

pytest.importorskip("lycoris")
import lycoris.kohya as lycoris_kohya  # noqa: E402
from lycoris.modules.locon import LoConModule  # noqa: E402
from lycoris.modules.loha import LohaModule  # noqa: E402
from lycoris.modules.lokr import LokrModule  # noqa: E402

from lokr_diffusion import AdapterConfig, create_network, load_network  # noqa: E402
from lokr_diffusion.algos import ModuleSettings, get_algorithm, lokr  # noqa: E402
from lokr_diffusion.dora import EPS, axis_norm, decomposed_weight, init_magnitude  # noqa: E402
from lokr_diffusion.errors import AdapterFileError  # noqa: E402
from lokr_diffusion.algos.common import apply_weight  # noqa: E402
from lokr_diffusion.layers import AdapterModule  # noqa: E402

from .helpers import load_components  # noqa: E402

LINEAR = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"  # (128, 16)
CONV = "down_blocks.0.resnets.0.conv1"  # (16, 16, 3, 3)
KEYS = {LINEAR: "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
        CONV: "lora_unet_down_blocks_0_resnets_0_conv1"}
LYCORIS = {"lokr": LokrModule, "loha": LohaModule, "lora": LoConModule}
RANK, ALPHA = 3, 1.5  # alpha / rank = 0.5: a scale applied twice would show


@pytest.fixture(scope="module")
def unet(tiny_sd15_path):
    return load_components(tiny_sd15_path)[0]


def _inputs(path):
    g = torch.Generator().manual_seed(7)
    return torch.randn(2, 5, 16, generator=g) if path == LINEAR else torch.randn(2, 16, 6, 6, generator=g)


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-12))


def _randomize(params, seed):
    """Random factors, and magnitudes 20 % off the norms they start at, so every term matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in params:
            if name.endswith("dora_scale"):
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _lycoris_module(algo, layer, tucker, dora, multiplier=1.0):
    extra = {"factor": 2} if algo == "lokr" else {}
    return LYCORIS[algo]("m", layer, multiplier, RANK, ALPHA, use_tucker=tucker, weight_decompose=dora, **extra)


CASES = [(algo, path, tucker, dora) for algo in LYCORIS for path in (LINEAR, CONV)
         for tucker, dora in ((False, True), (True, False), (True, True)) if path == CONV or not tucker]


def _id(case):
    algo, path, tucker, dora = case
    return f"{algo}-{'conv' if path == CONV else 'linear'}" + ("-tucker" if tucker else "") + ("-dora" if dora else "")


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_lycoris_module_loads_here_with_its_outputs_and_gradients(unet, tmp_path, case):
    algo, path, tucker, dora = case
    layer = unet.get_submodule(path)
    theirs = _lycoris_module(algo, copy.deepcopy(layer), tucker, dora)
    _randomize(theirs.named_parameters(), seed=len(_id(case)))
    sd = {f"{KEYS[path]}.{n}": t.detach().contiguous() for n, t in theirs.custom_state_dict().items()}
    assert ("lokr_t2" in str(list(sd)) or "hada_t1" in str(list(sd)) or "lora_mid" in str(list(sd))) == tucker
    assert any(k.endswith(".dora_scale") for k in sd) == dora
    file = tmp_path / "lycoris.safetensors"
    save_file(sd, str(file))
    ours, report = load_network(file, unet=unet, strict=True)
    try:
        assert report.patched == {"unet": 1}
        adapter = ours.adapter(KEYS[path])
        theirs.apply_to()
        x = _inputs(path)
        y_theirs = theirs.org_module[0](x)
        y_ours = layer(x)  # grad enabled: our training path
        assert _rel(y_ours, y_theirs) <= 1e-5, (_id(case), _rel(y_ours, y_theirs))
        g = torch.randn(y_ours.shape, generator=torch.Generator().manual_seed(1))
        (y_theirs * g).sum().backward()
        (y_ours * g).sum().backward()
        their_grads = {n: p.grad for n, p in theirs.named_parameters()}
        for name, p in adapter.tensors().items():
            assert _rel(p.grad, their_grads[name]) <= 1e-5, (_id(case), name)
        with torch.no_grad():  # inference: the cached W + dW path
            assert _rel(layer(x), theirs.org_module[0](x)) <= 1e-5
    finally:
        ours.remove()


@pytest.mark.parametrize("algo", list(LYCORIS))
def test_our_files_rebuild_in_lycoris(unet, tmp_path, algo):
    """create_network with weight_decompose + use_tucker: the same tensor names, shapes and
    initial magnitudes as LyCORIS; saved, the file's forward in LyCORIS equals ours."""
    cfg = AdapterConfig(algo=algo, preset="attn-only", factor=2, dim=RANK, alpha=ALPHA, conv_dim=RANK, conv_alpha=ALPHA,
                        weight_decompose=True, use_tucker=True, include=tuple(KEYS.values()))
    plain = {path: copy.deepcopy(unet.get_submodule(path)) for path in KEYS}  # copies without our hook
    net = create_network(cfg, unet=unet)
    try:
        assert set(KEYS.values()) <= set(net.module_keys())
        for path, key in KEYS.items():
            fresh = _lycoris_module(algo, copy.deepcopy(plain[path]), True, True)
            want = {n: tuple(t.shape) for n, t in fresh.custom_state_dict().items()}
            got = {n: tuple(t.shape) for n, t in net.adapter(key).tensors().items()} | {"alpha": ()}
            assert got == want, (algo, path)
            assert torch.equal(net.adapter(key).get_parameter("dora_scale"), fresh.dora_scale.detach())
            with torch.no_grad():
                assert torch.equal(net.adapter(key).delta_weight(), torch.zeros_like(unet.get_submodule(path).weight)) \
                    or _rel(net.adapter(key).delta_weight() + unet.get_submodule(path).weight,
                            unet.get_submodule(path).weight) < 1e-6  # starts at W (up to eps)
        _randomize(net.named_parameters(), seed=3)
        file = tmp_path / "ours.safetensors"
        net.save(file, dtype=torch.float32)
        from safetensors.torch import load_file
        sd = load_file(file)
        for path, key in KEYS.items():
            layer = unet.get_submodule(path)
            lyco_type, params = lycoris_kohya.get_module(sd, key)
            owner = copy.deepcopy(plain[path])
            if algo == "lokr" and path == CONV:
                # LyCORIS's loader reads the rank of a Tucker LoKr from lokr_w2_a's second side, which is b
                # in its own Tucker layout, so it rebuilds a wrong module: its forward on a module given the
                # state dict is the reference instead
                with pytest.raises((RuntimeError, AttributeError)):
                    lycoris_kohya.make_module(lyco_type, params, key, owner)
                theirs = _lycoris_module(algo, owner, True, True)
                theirs.load_state_dict({n[len(key) + 1:]: t for n, t in sd.items() if n.startswith(key + ".")})
            else:
                theirs = lycoris_kohya.make_module(lyco_type, params, key, owner)
            theirs.apply_to()
            x = _inputs(path)
            with torch.no_grad():
                assert _rel(layer(x), owner(x)) <= 1e-5, (algo, path, _rel(layer(x), owner(x)))
    finally:
        net.remove()


# -- the formulas each tool applies to a dora_scale file, restated from their code ------------


def lycoris_forward(w, d, m, multiplier):
    """LyCORIS 4.1.3 (modules/*.py forward, functional/general.py weight_decompose): the multiplier
    interpolates the magnitude rescale of W + D, and D itself is always applied in full."""
    merged = w + d
    out_axis = m.shape[0] == w.shape[0] and m.shape[1] == 1
    rescale = m / (axis_norm(merged, out_axis) + EPS)
    return merged * (multiplier * (rescale - 1) + 1)


def comfyui(w, d, m, strength):
    """ComfyUI (comfy/weight_adapter/base.py weight_decompose): an output-axis magnitude (its shape[0]
    is out) divides by the norm of the *base* weight W, an input-axis one by the norm of W + D per
    input column; the strength scales the change."""
    merged = w + d
    norm = axis_norm(w, True) if m.shape[0] == w.shape[0] else axis_norm(merged, False)
    return w + strength * (merged * (m / (norm + EPS)) - w)


def a1111(w, d, m, multiplier):
    """AUTOMATIC1111 1.10 (extensions-builtin/Lora/network.py apply_weight_decompose): the norm is
    always per input column of W + D, without eps, whatever the magnitude's shape (an (out, 1) one
    broadcasts against it); the multiplier scales the change."""
    merged = w + d
    return w + multiplier * (merged * (m / axis_norm(merged, False)) - w)


def _ours(w, d, m, multiplier):
    return w + multiplier * (decomposed_weight(w, d, m) - w)


@pytest.mark.parametrize("algo", ["lokr", "loha", "lora"])
def test_restated_lycoris_formula_is_its_forward_and_ours_at_multiplier_1(unet, algo):
    layer = unet.get_submodule(CONV)
    theirs = _lycoris_module(algo, copy.deepcopy(layer), False, True)
    _randomize(theirs.named_parameters(), seed=11)
    theirs.apply_to()
    w = layer.weight.detach()
    d = theirs.get_weight(theirs.shape).detach() if algo != "lora" else theirs.make_weight().detach() * theirs.scale
    m = theirs.dora_scale.detach()
    x = _inputs(CONV)
    for multiplier in (1.0, 0.5, 0.0):
        theirs.multiplier = multiplier
        with torch.no_grad():
            want = theirs.org_module[0](x)
            got = nn.functional.conv2d(x, lycoris_forward(w, d, m, multiplier), layer.bias, padding=1)
        assert _rel(got, want) <= 1e-5, (algo, multiplier)
    assert _rel(_ours(w, d, m, 1.0), lycoris_forward(w, d, m, 1.0)) <= 1e-6
    # elsewhere they part: LyCORIS keeps D at multiplier 0, we (and the UIs) leave W
    assert torch.equal(_ours(w, d, m, 0.0), w)
    assert _rel(lycoris_forward(w, d, m, 0.0), w + d) <= 1e-6


def test_restated_ui_formulas_against_ours():
    g = torch.Generator().manual_seed(5)
    w, d = torch.randn(12, 8, 3, 3, generator=g), torch.randn(12, 8, 3, 3, generator=g) * 0.3
    m_out = axis_norm(w + d, True) * (1 + 0.2 * torch.rand(12, 1, 1, 1, generator=g))
    m_in = axis_norm(w + d, False) * (1 + 0.2 * torch.rand(1, 8, 1, 1, generator=g))
    # an input-axis magnitude (LyCORIS wd_on_out = False): ComfyUI and A1111 apply what we apply,
    # the strength scaling the change in all three (A1111 without eps)
    for lam in (1.0, 0.6):
        assert _rel(comfyui(w, d, m_in, lam), _ours(w, d, m_in, lam)) <= 1e-6
        assert _rel(a1111(w, d, m_in, lam), _ours(w, d, m_in, lam)) <= 1e-5
    # LyCORIS's default output-axis magnitude: ComfyUI normalises by ||W|| instead of ||W + D||,
    # so it agrees with us where D keeps the row norms (D = 0 here) and not in general
    ours = _ours(w, d, m_out, 1.0)
    assert _rel(comfyui(w, d, m_out, 1.0), ours) > 1e-3
    zero = torch.zeros_like(d)
    assert _rel(comfyui(w, zero, m_out, 1.0), _ours(w, zero, m_out, 1.0)) <= 1e-6
    # ... and A1111 divides each m[o] by the input-column norm m[o] / ||(W + D)[:, i]||: a different weight
    assert _rel(a1111(w, d, m_out, 1.0), ours) > 1e-2


def test_init_magnitude_is_lycoris_init(unet):
    for path in (LINEAR, CONV):
        layer = unet.get_submodule(path)
        fresh = LokrModule("m", copy.deepcopy(layer), 1.0, RANK, ALPHA, weight_decompose=True)
        assert torch.equal(init_magnitude(layer.weight), fresh.dora_scale.detach())
        assert tuple(fresh.dora_scale.shape) == (layer.weight.shape[0], *[1] * (layer.weight.dim() - 1))


def test_dora_fuse_unfuse_is_bit_exact_and_multiplier_scales_the_change(unet):
    layer = unet.get_submodule(CONV)
    original = layer.weight.detach().clone()
    tensors = get_algorithm("lokr").init_tensors(tuple(layer.weight.shape), ModuleSettings(RANK, ALPHA, factor=2))
    tensors["dora_scale"] = init_magnitude(layer.weight)
    adapter = AdapterModule(KEYS[CONV], layer, get_algorithm("lokr"), tensors, ALPHA, multiplier=0.7)
    _randomize(adapter.named_parameters(), seed=2)
    adapter.attach()
    try:
        x = _inputs(CONV)
        with torch.no_grad():
            unfused = layer(x)
            want = nn.functional.conv2d(x, _ours(original, adapter.algo.delta_weight(adapter.factors(), tuple(
                original.shape)) * adapter.scale, adapter.dora_scale, 0.7), layer.bias, padding=1)
            assert _rel(unfused, want) <= 1e-5
            adapter.merge()
            assert _rel(layer(x), unfused) <= 1e-5
            adapter.unmerge()
        assert torch.equal(layer.weight, original)
    finally:
        adapter.detach()


def test_bad_dora_scale_is_refused_with_the_module_named(unet, tmp_path):
    key = KEYS[LINEAR]
    t = get_algorithm("lora").init_tensors((128, 16), ModuleSettings(RANK, ALPHA))
    sd = {f"{key}.{n}": v for n, v in t.items()} | {f"{key}.alpha": torch.tensor(ALPHA),
                                                    f"{key}.dora_scale": torch.ones(16, 1)}
    file = tmp_path / "bad.safetensors"
    save_file(sd, str(file))
    with pytest.raises(AdapterFileError, match=r"ff_net_0_proj: DoRA magnitude dora_scale of shape \(16, 1\) fits neither"):
        load_network(file, unet=unet)


@pytest.mark.parametrize("algo, path, tucker", [("lokr", LINEAR, False), ("lokr", CONV, False), ("lokr", CONV, True),
                                                ("lora", LINEAR, False), ("lora", CONV, False)],
                         ids=["lokr-linear", "lokr-conv", "lokr-conv-tucker", "lora-linear", "lora-conv"])
def test_dora_trains_through_the_factored_path(unet, algo, path, tucker):
    """Training never forms W + D: the row norms come from contractions of W with the factors and
    the frozen layer's own output is rescaled. Same outputs and gradients as the rebuilt weight,
    on every LoKr order the cost model may pick."""
    layer = unet.get_submodule(path)
    settings = ModuleSettings(RANK, ALPHA, factor=2, use_tucker=tucker)
    tensors = get_algorithm(algo).init_tensors(tuple(layer.weight.shape), settings)
    tensors["dora_scale"] = init_magnitude(layer.weight)
    adapter = AdapterModule(KEYS[path], layer, get_algorithm(algo), tensors, ALPHA, multiplier=0.8)
    _randomize(adapter.named_parameters(), seed=9)
    adapter.attach()
    x = _inputs(path)
    try:
        original = adapter.base.__dict__["_lokr_dispatch"].original
        want_y = original(x) + apply_weight(x, adapter.delta_weight() * 0.8, layer)  # the rebuilt W + D
        want_grads = torch.autograd.grad(want_y.square().sum(), list(adapter.parameters()))
        for order in (("in", "out", "tok") if algo == "lokr" else (None,)):
            with lokr.force_path(order):
                assert adapter._dora_factored(x, adapter.factors(), original(x)) is not None, order
                y = layer(x)
            grads = torch.autograd.grad(y.square().sum(), list(adapter.parameters()))
            assert _rel(y, want_y) <= 1e-5, order
            for got, want in zip(grads, want_grads):
                assert _rel(got, want) <= 1e-5, order
    finally:
        adapter.detach()

"""The fast LoKr paths against the plain rebuild-and-add path: outputs and every gradient.

`lokr.force_path` makes every LoKr layer take one path: "in", "out" and "tok" (the factored
orders of lokr_diffusion.kron_autograd; "tok" is linear-only, convs take "in" for it) or
"rebuild" (form dW = kron(w1, w2); on these fp32 layers it is added to the layer's weight for the
call, so the layer runs one linear/conv with W + dW), or "fold-in" / "fold-tok" (linear layers:
dW detached in the weight, the factors' gradients from the activations; "fold-tok" is "fold-in" on convs).
All must agree on the output and on the gradients w.r.t. the input and every factor, for linear
layers, 1x1 and k x k convolutions (stride, padding), full and low-rank factors, in fp32 (and
bf16 on CUDA when present).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lokr_diffusion import AdapterModule, ModuleSettings
from lokr_diffusion import kron_autograd as ka
from lokr_diffusion.algos import lokr
from lokr_diffusion.kron import kron

PATHS = lokr.PATHS
FACTORED = tuple(p for p in PATHS if p != "rebuild")


def _adapter(base, settings, multiplier=0.7, alpha=None, seed=0):
    t = lokr.init_tensors(tuple(base.weight.shape), settings)
    g = torch.Generator().manual_seed(seed)
    t = {n: torch.randn(v.shape, generator=g) * 0.5 for n, v in t.items()}
    r = lokr.rank(t)
    if alpha is None:
        alpha = settings.alpha if r is not None else settings.dim
    a = AdapterModule("probe", base, lokr, t, alpha, multiplier=multiplier)
    a.attach()
    return a


def _run(base, adapter, x, g, path):
    """Output and gradients (input, then each factor by name) with `path` forced."""
    x = x.detach().clone().requires_grad_(True)
    for p in adapter.parameters():
        p.grad = None
    with lokr.force_path(path):
        y = base(x)
        y.backward(g)
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in adapter.named_parameters()}


def _close(got, ref, what, rel=2e-5):
    """Equal to float tolerance relative to the tensor's scale (gradients are long sums)."""
    assert got.shape == ref.shape, what
    got, ref = got.detach(), ref.detach()
    err = float((got.double() - ref.double()).abs().max())
    scale = float(ref.double().abs().max())
    assert err <= rel * scale + 1e-7, f"{what}: max error {err:.3g} at scale {scale:.3g}"


def _assert_paths_agree(base, adapter, x, rel=2e-5):
    base.requires_grad_(False)
    with torch.no_grad():
        g = torch.randn_like(base(x)).contiguous()
    ref = _run(base, adapter, x, g, "rebuild")
    for path in FACTORED:
        got = _run(base, adapter, x, g, path)
        _close(got[0], ref[0], f"{path} output", rel)
        _close(got[1], ref[1], f"{path} input grad", rel)
        assert got[2].keys() == ref[2].keys()
        for name in ref[2]:
            _close(got[2][name], ref[2][name], f"{path} grad of {name}", rel)


LINEAR_CASES = [
    pytest.param(64, 48, ModuleSettings(8, 8, factor=8, full_matrix=True), id="f8-full"),
    pytest.param(128, 96, ModuleSettings(2, 1, factor=-1), id="balanced-lowrank"),
    pytest.param(60, 40, ModuleSettings(2, 1, factor=-1, decompose_both=True), id="both-lowrank"),
    pytest.param(96, 256, ModuleSettings(4, 4, factor=8, full_matrix=True), id="wide-out"),
    pytest.param(256, 32, ModuleSettings(4, 4, factor=8, full_matrix=True), id="wide-in"),
    pytest.param(21, 14, ModuleSettings(4, 4, factor=-1, full_matrix=True), id="odd-dims"),
]


@pytest.mark.parametrize("cin,cout,s", LINEAR_CASES)
def test_linear_paths_agree(cin, cout, s):
    torch.manual_seed(0)
    base = nn.Linear(cin, cout)
    adapter = _adapter(base, s)
    _assert_paths_agree(base, adapter, torch.randn(2, 7, cin))
    _assert_paths_agree(base, adapter, torch.randn(5, cin))  # 2-D input too


CONV_CASES = [
    pytest.param({"kernel_size": 1}, ModuleSettings(8, 8, factor=4, full_matrix=True), id="1x1-full"),
    pytest.param({"kernel_size": 1}, ModuleSettings(2, 1, factor=-1), id="1x1-lowrank"),
    pytest.param({"kernel_size": 1, "stride": 2}, ModuleSettings(8, 8, factor=4, full_matrix=True), id="1x1-stride2"),
    pytest.param({"kernel_size": 3, "padding": 1}, ModuleSettings(8, 8, factor=8, full_matrix=True), id="3x3-full"),
    pytest.param({"kernel_size": 3, "padding": 1}, ModuleSettings(2, 1, factor=-1), id="3x3-lowrank"),
    pytest.param({"kernel_size": 3, "stride": 2, "padding": 1}, ModuleSettings(8, 8, factor=8, full_matrix=True),
                 id="3x3-stride2"),
    pytest.param({"kernel_size": 3}, ModuleSettings(8, 8, factor=4, full_matrix=True), id="3x3-nopad"),
    pytest.param({"kernel_size": 3, "padding": 2, "dilation": 2}, ModuleSettings(2, 1, factor=-1), id="3x3-dilated"),
]


@pytest.mark.parametrize("geom,s", CONV_CASES)
def test_conv_paths_agree(geom, s):
    torch.manual_seed(0)
    base = nn.Conv2d(32, 48, **geom)
    adapter = _adapter(base, s)
    _assert_paths_agree(base, adapter, torch.randn(2, 32, 9, 8))


def test_channels_last_pointwise_conv_keeps_layout_and_agrees():
    torch.manual_seed(0)
    base = nn.Conv2d(32, 48, 1)
    adapter = _adapter(base, ModuleSettings(8, 8, factor=4, full_matrix=True))
    x = torch.randn(2, 32, 6, 5).to(memory_format=torch.channels_last)
    _assert_paths_agree(base, adapter, x)
    with lokr.force_path("in"), torch.no_grad():
        assert adapter.delta(x).is_contiguous(memory_format=torch.channels_last)


def test_tucker_and_scale_folding():
    """A Tucker w2 (read from other tools' files) and alpha != rank, multiplier != 1."""
    torch.manual_seed(0)
    base = nn.Conv2d(10, 12, 3, padding=1)
    t = {"lokr_w1": torch.randn(3, 2), "lokr_t2": torch.randn(2, 2, 3, 3),
         "lokr_w2_a": torch.randn(2, 4), "lokr_w2_b": torch.randn(2, 5)}
    adapter = AdapterModule("probe", base, lokr, t, alpha=5.0, multiplier=0.3)
    adapter.attach()
    _assert_paths_agree(base, adapter, torch.randn(2, 10, 7, 7))
    lin = nn.Linear(128, 96)
    _assert_paths_agree(lin, _adapter(lin, ModuleSettings(2, 7.0, factor=-1), multiplier=1.7), torch.randn(3, 128))


def test_functions_match_explicit_kron_in_float64():
    """The autograd functions alone, against F.linear / F.conv2d with kron(w1, w2), to 1e-10."""
    torch.manual_seed(0)
    dt = torch.float64
    w1 = torch.randn(4, 3, dtype=dt, requires_grad=True)
    w2 = torch.randn(5, 6, dtype=dt, requires_grad=True)
    x = torch.randn(7, 18, dtype=dt, requires_grad=True)
    g = torch.randn(7, 20, dtype=dt)
    ref = torch.autograd.grad(F.linear(x, kron(w1, w2)), (x, w1, w2), g)
    for order in FACTORED:
        y = ka._KronLinear.apply(x, w1, w2, order)
        torch.testing.assert_close(y, F.linear(x, kron(w1, w2)), rtol=1e-10, atol=1e-10)
        for r, q in zip(ref, torch.autograd.grad(y, (x, w1, w2), g)):
            torch.testing.assert_close(q, r, rtol=1e-10, atol=1e-10)
    w2c = torch.randn(5, 6, 3, 3, dtype=dt, requires_grad=True)
    xc = torch.randn(2, 18, 8, 7, dtype=dt, requires_grad=True)
    ref_y = F.conv2d(xc, kron(w1, w2c), None, 2, 1)
    gc = torch.randn_like(ref_y)
    ref = torch.autograd.grad(ref_y, (xc, w1, w2c), gc)
    for order in ("in", "out"):
        y = ka.kron_conv2d(xc, w1, w2c, (2, 2), (1, 1), (1, 1), order)
        for r, q in zip(ref, torch.autograd.grad(y, (xc, w1, w2c), gc)):
            torch.testing.assert_close(q, r, rtol=1e-10, atol=1e-10)


def test_inference_paths_agree_without_grad():
    """Without grad the delta runs the forward-only code of each path; fused and unfused agree."""
    torch.manual_seed(0)
    for base, x in ((nn.Linear(64, 48), torch.randn(3, 64)), (nn.Conv2d(16, 24, 3, padding=1), torch.randn(2, 16, 5, 5))):
        adapter = _adapter(base, ModuleSettings(8, 8, factor=4, full_matrix=True))
        with torch.no_grad():
            deltas = {}
            for path in PATHS:
                with lokr.force_path(path):
                    deltas[path] = adapter.delta(x)
            unfused = base(x)
        for path in FACTORED:
            _close(deltas[path], deltas["rebuild"], path)
        reference = F.linear(x, base.weight, base.bias) if isinstance(base, nn.Linear) else base._conv_forward(
            x, base.weight, base.bias)
        _close(unfused, reference + deltas["rebuild"], "unfused", 1e-5)
        adapter.merge()
        with torch.no_grad():
            _close(base(x), unfused, "fused", 1e-5)  # fused = unfused
        adapter.unmerge()


def test_shared_input_regrouping_is_safe():
    """q, k, v read one tensor: its regrouped copy is shared, and an in-place change invalidates it."""
    torch.manual_seed(0)
    layers = [nn.Linear(64, 64) for _ in range(3)]
    adapters = [_adapter(m, ModuleSettings(8, 8, factor=8, full_matrix=True), seed=i) for i, m in enumerate(layers)]
    x = torch.randn(2, 5, 64)
    g = [torch.randn(2, 5, 64) for _ in layers]

    def grads(path):
        xr = x.clone().requires_grad_(True)
        for a in adapters:
            for p in a.parameters():
                p.grad = None
        with lokr.force_path(path):
            ys = [m(xr) for m in layers]
        torch.autograd.backward(ys, g)
        return [xr.grad] + [p.grad.clone() for a in adapters for p in a.parameters()]

    copies, real_regroup = [], ka._regroup

    def regroup(x2, c, d):
        cached = ka._regrouped[3]
        xc = real_regroup(x2, c, d)
        copies.append(xc is not cached)
        return xc

    reference = grads("rebuild")
    try:
        ka._regroup = regroup
        for path in ("in", "fold-in"):
            copies.clear()
            for i, (r, q) in enumerate(zip(reference, grads(path))):
                _close(q, r, f"{path} gradient {i}")
            assert copies == [True, False, False], (path, copies)  # each layer views the 3-D input anew
    finally:
        ka._regroup = real_regroup
    x2 = torch.randn(4, 64)
    with lokr.force_path("in"), torch.no_grad():
        before = layers[0](x2)
        x2.mul_(2.0)  # same tensor object, new values: must not reuse the stale regrouping
        after = layers[0](x2)
        expected = F.linear(x2, layers[0].weight, layers[0].bias) + 0.7 * F.linear(x2, adapters[0].delta_weight())
    _close(after, expected, "after an in-place change")
    assert not torch.allclose(before, after)


def test_path_choice_is_a_function_of_shapes_only():
    """plan() is pure, and forward's choice does not depend on the values it sees."""
    args = [("linear", 2048, 2048, 8, 16, 8, 16, 1, True, 4, "cpu"),
            ("linear", 154, 154, 8, 64, 8, 96, 1, True, 4, "cpu"),
            ("linear", 2, 2, 8, 160, 8, 160, 1, True, 4, "cpu"),
            ("conv", 2048, 512, 8, 16, 8, 16, 9, True, 4, "cpu"),
            ("conv", 512, 512, 8, 32, 8, 32, 1, False, 2, "cuda")]
    first = [lokr.plan(*a) for a in args]
    lokr.plan.cache_clear()
    assert [lokr.plan(*a) for a in args] == first
    for a, p in zip(args, first):
        costs = lokr.path_costs(*a)
        assert p == min(costs, key=costs.get) and p in PATHS
    with pytest.raises(ValueError), lokr.force_path("sideways"):
        pass

    seen = []
    real_linear, real_conv, real_forward = lokr.kron_linear, lokr.kron_conv2d, lokr.forward

    def forward(*args, **kwargs):
        y = real_forward(*args, **kwargs)
        if y is None:
            seen.append("rebuild")
        return y

    real_grads, real_conv_grads = lokr.kron_linear_grads, lokr.kron_conv2d_grads
    try:
        lokr.kron_linear_grads = lambda y, x, w1, w2, order: seen.append(("fold", order)) or real_grads(y, x, w1, w2, order)
        lokr.kron_conv2d_grads = lambda y, x, w1, w2, *geom: seen.append(("fold", "conv")) or real_conv_grads(y, x, w1, w2, *geom)
        lokr.kron_linear = lambda x, w1, w2, order: seen.append(("linear", order)) or real_linear(x, w1, w2, order)
        lokr.kron_conv2d = lambda x, w1, w2, s, p, d, order: seen.append(("conv", order)) or real_conv(x, w1, w2, s, p, d, order)
        lokr.forward = forward
        cases = ((nn.Linear(128, 512), (2, 64, 128), ("fold", "tok")), (nn.Linear(512, 512), (2, 16, 512), ("linear", "tok")),
                 (nn.Linear(32, 32), (2, 2048, 32), "rebuild"),
                 (nn.Conv2d(64, 64, 3, padding=1), (2, 64, 8, 8), "rebuild"),
                 (nn.Conv2d(128, 128, 1), (2, 128, 32, 32), ("fold", "conv")),
                 (nn.Conv2d(512, 512, 3, padding=1), (2, 512, 4, 4), ("conv", "in")))
        for base, shape, expected in cases:
            adapter = _adapter(base, ModuleSettings(8, 8, factor=8, full_matrix=True))
            for seed in (1, 2):
                torch.manual_seed(seed)
                base(torch.randn(shape) * seed).sum().backward()
            assert seen == [expected, expected], (base, seen)
            seen.clear()
            adapter.detach()
    finally:
        lokr.kron_linear, lokr.kron_conv2d, lokr.forward = real_linear, real_conv, real_forward
        lokr.kron_linear_grads, lokr.kron_conv2d_grads = real_grads, real_conv_grads


def test_sd_layer_choices_are_stable():
    """Every attn-mlp layer of the real SD 1.5 UNet at 64x64 latents gets a path, the same twice."""
    from lokr_diffusion.kron import factorization
    from lokr_diffusion.families import get_family
    from lokr_diffusion.targets import select_targets

    unet, _ = get_family("sd15").build_meta()
    keys = []
    for t in select_targets("unet", unet, "attn-mlp", lambda p: p, family=get_family("sd15")):
        w = t.module.weight
        a, b = factorization(w.shape[0], 8)
        c, d = factorization(w.shape[1], 8)
        side = 64 // 2 ** min(int(t.path.split(".")[1]), 3) if "blocks." in t.path[:10] else 8
        if t.path.startswith("up_blocks"):
            side = 64 // 2 ** (3 - int(t.path.split(".")[1]))
        n = 2 * 77 if ("attn2.to_k" in t.path or "attn2.to_v" in t.path) else 2 * side * side
        kind = "conv" if isinstance(t.module, nn.Conv2d) else "linear"
        keys.append((kind, n, n, a, b, c, d, 1, True, 4, "cpu"))
    picks = [lokr.plan(*k) for k in keys]
    assert len(picks) == 192 and set(picks) <= set(PATHS)
    lokr.plan.cache_clear()
    assert picks == [lokr.plan(*k) for k in keys]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("make_base,shape", [
    (lambda: nn.Linear(256, 512), (2, 64, 256)),
    (lambda: nn.Conv2d(64, 128, 1), (2, 64, 16, 16)),
    (lambda: nn.Conv2d(64, 128, 3, padding=1), (2, 64, 16, 16)),
    (lambda: nn.Conv2d(64, 128, 3, stride=2, padding=1), (2, 64, 16, 16)),
], ids=["linear", "conv1x1", "conv3x3", "conv3x3-s2"])
@pytest.mark.parametrize("s", [ModuleSettings(8, 8, factor=8, full_matrix=True), ModuleSettings(4, 4, factor=-1)],
                         ids=["f8-full", "lowrank"])
def test_bf16_cuda_paths_agree(make_base, shape, s):
    """bf16 base weights, fp32 factors, bf16 autocast: the factored paths match rebuild to bf16 precision."""
    torch.manual_seed(0)
    base = make_base().cuda().to(torch.bfloat16).requires_grad_(False)
    adapter = _adapter(base, s).cuda()
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.no_grad():
        g = torch.randn_like(base(x))
    res = {}
    for path in PATHS:
        xr = x.clone().requires_grad_(True)
        for p in adapter.parameters():
            p.grad = None
        with lokr.force_path(path), torch.autocast("cuda", dtype=torch.bfloat16):
            y = base(xr)
        y.backward(g)
        res[path] = [y.float(), xr.grad.float()] + [p.grad.float() for p in adapter.parameters()]
    for path in FACTORED:
        for got, ref in zip(res[path], res["rebuild"]):
            scale = ref.abs().max().clamp_min(1e-6)
            assert float((got - ref).abs().max() / scale) < 3e-2, path


def _extra_flops_per_token(base: nn.Module, make_x, algo_name: str, tokens: tuple[int, int],
                           path: str = "rebuild") -> float:
    """Matrix-product FLOPs per token (or output pixel) that a training step of the adapted
    layer adds to the frozen layer's step, from two input sizes (what does not grow with the
    input, building dW from its factors, drops out)."""
    from torch.utils.flop_counter import FlopCounterMode

    from lokr_diffusion.algos import get_algorithm

    algo = get_algorithm(algo_name)
    base.requires_grad_(False)

    def step_flops(n: int) -> int:
        x = make_x(n).requires_grad_(True)
        with FlopCounterMode(display=False) as counter, lokr.force_path(path):
            base(x).float().square().sum().backward()
        return counter.get_total_flops()

    frozen = [step_flops(n) for n in tokens]
    t = algo.init_tensors(tuple(base.weight.shape), ModuleSettings(4, 4, factor=4))
    t = {n: torch.randn(v.shape) * 0.1 for n, v in t.items()}
    adapter = AdapterModule("probe", base, algo, t, 4.0)
    adapter.attach()
    try:
        adapted = [step_flops(n) for n in tokens]
    finally:
        adapter.detach()
    return ((adapted[1] - frozen[1]) - (adapted[0] - frozen[0])) / (tokens[1] - tokens[0])


@pytest.mark.parametrize("algo_name", ["loha", "lokr"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_rebuilt_update_costs_one_product_when_folded(algo_name, kind):
    """Where dW is rebuilt (LoHa always, LoKr where its cost model says so) on an fp32 layer,
    the training step adds W + dW into the layer's own product: one full-size product more
    than the frozen layer (the weight gradient), not three (a forward, the input gradient and
    the weight gradient of a product of its own), which is what a bf16 layer still pays."""
    if kind == "linear":
        base = nn.Linear(48, 32)
        make_x = lambda n: torch.randn(n, 48)  # noqa: E731
        per_token = 2 * 48 * 32
    else:
        base = nn.Conv2d(8, 16, 3, padding=1)
        make_x = lambda n: torch.randn(n, 8, 5, 5)  # noqa: E731
        per_token = 2 * 8 * 16 * 9 * 25  # per sample: 25 output pixels
    folded = _extra_flops_per_token(base, make_x, algo_name, (4, 12))
    assert folded == per_token, (folded, per_token)
    base.to(torch.bfloat16)
    unfolded = _extra_flops_per_token(base, lambda n: make_x(n).to(torch.bfloat16), algo_name, (4, 12))
    assert unfolded == 3 * per_token, (unfolded, per_token)


@pytest.mark.parametrize("path", ["fold-in", "fold-tok"])
def test_a_folded_lokr_update_adds_no_full_size_product(path):
    """LoKr's fold paths on an fp32 layer: the forward and the input gradient are the layer's
    own products with W + dW, and the only products added to the frozen layer's step are the
    factor gradients' contractions. Linear: 4 (acd + abd) FLOPs per token (z = w1 mix, w2's
    gradient, the output mix, w1's gradient), against 2 * out * in for a weight gradient. Conv
    (3x3 over 5x5, "fold-in" either way): the same per pixel, w2's products carrying the kernel."""
    base = nn.Linear(48, 32)
    a, b, c, d = lokr.factor_shapes((32, 48), 4)
    extra = _extra_flops_per_token(base, lambda n: torch.randn(n, 48), "lokr", (4, 12), path)
    assert extra == 4 * (a * c * d + a * b * d), (extra, a, b, c, d)
    assert extra < 2 * 48 * 32  # less than the one weight gradient of the rebuilt fold
    conv = nn.Conv2d(32, 32, 3, padding=1)
    a, b, c, d = lokr.factor_shapes((32, 32, 3, 3), 4)
    extra = _extra_flops_per_token(conv, lambda n: torch.randn(n, 32, 5, 5), "lokr", (4, 12), path)
    assert extra == 25 * 4 * (a * c * d + a * b * d * 9), (extra, a, b, c, d)
    assert extra < 25 * 2 * 32 * 32 * 9


def test_folded_update_with_module_dropout():
    """A folded module that module dropout drops adds nothing, one it keeps adds W + dW."""
    base = nn.Linear(48, 32).requires_grad_(False)
    from lokr_diffusion.algos import get_algorithm

    loha = get_algorithm("loha")
    t = {n: torch.randn(v.shape) * 0.3 for n, v in loha.init_tensors((32, 48), ModuleSettings(4, 4)).items()}
    adapter = AdapterModule("probe", base, loha, t, 4.0, multiplier=0.5, module_dropout=0.5)
    adapter.attach()
    x = torch.randn(6, 48)
    with torch.no_grad():
        frozen = F.linear(x, base.weight, base.bias)
        full = F.linear(x, base.weight + 0.5 * adapter.delta_weight(), base.bias)
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        y = base(x)
        if not y.requires_grad:  # nothing trainable in this call
            torch.testing.assert_close(y, frozen)
            seen.add("dropped")
        else:
            _close(y, full, "kept module")
            y.sum().backward()
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
            adapter.zero_grad(set_to_none=True)
            seen.add("kept")
    assert seen == {"dropped", "kept"}

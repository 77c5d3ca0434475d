"""The weight math against explicit torch.kron / matrix constructions."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lokr_diffusion import factorization, kron
from lokr_diffusion.algos import loha, lokr, lora
from lokr_diffusion.algos.common import ModuleSettings, apply_weight

SPEC_TABLE = {  # dim: {factor: pair}, from the format spec
    320: {-1: (16, 20), 4: (4, 80), 8: (8, 40), 16: (16, 20)},
    640: {-1: (20, 32), 4: (4, 160), 8: (8, 80), 16: (16, 40)},
    768: {-1: (24, 32), 4: (4, 192), 8: (8, 96), 16: (16, 48)},
    1280: {-1: (32, 40), 4: (4, 320), 8: (8, 160), 16: (16, 80)},
    2048: {-1: (32, 64), 4: (4, 512), 8: (8, 256), 16: (16, 128)},
}
SPEC_BALANCED = {960: (30, 32), 1024: (32, 32), 1920: (40, 48), 2560: (40, 64), 2816: (44, 64),
                 3072: (48, 64), 5120: (64, 80), 10240: (80, 128), 4: (2, 2), 127: (1, 127)}


@pytest.mark.parametrize("dim", sorted(SPEC_TABLE))
def test_factorization_table(dim):
    for factor, pair in SPEC_TABLE[dim].items():
        assert factorization(dim, factor) == pair, (dim, factor)


def test_factorization_balanced_and_edges():
    for dim, pair in SPEC_BALANCED.items():
        assert factorization(dim, -1) == pair, dim
    assert factorization(320, 32) == (10, 32)  # the swap puts the smaller value on w1
    with pytest.raises(ValueError):
        factorization(320, 0)


@settings(max_examples=200, deadline=None)
@given(dim=st.integers(1, 5000), factor=st.integers(-1, 64).filter(lambda f: f != 0))
def test_factorization_properties(dim, factor):
    m, n = factorization(dim, factor)
    assert m * n == dim and m <= n
    if factor > 0 and dim % factor == 0:
        assert factor in (m, n)
    elif factor > 0:
        assert m <= factor


@settings(max_examples=60, deadline=None)
@given(a=st.integers(1, 5), b=st.integers(1, 5), c=st.integers(1, 5), d=st.integers(1, 5),
       k=st.sampled_from([(), (1, 1), (3, 3), (1, 3)]))
def test_kron_matches_torch_kron(a, b, c, d, k):
    w1, w2 = torch.randn(a, c), torch.randn(b, d, *k)
    ref = torch.kron(w1.reshape(a, c, *([1] * len(k))), w2)
    assert torch.equal(kron(w1, w2), ref)


def _ref_lokr(t, shape):
    """Independent restatement: build w1, w2 then torch.kron."""
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    a, c = w1.shape
    b, d = shape[0] // a, shape[1] // c
    k = shape[2:]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"].reshape(b, d, *k)
    elif "lokr_t2" in t:
        w2 = torch.zeros(b, d, *k)
        t2, wa, wb = t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"]
        for i in range(t2.shape[0]):
            for j in range(t2.shape[1]):
                w2 += t2[i, j] * torch.outer(wa[i], wb[j]).reshape(b, d, *([1] * len(k)))
    else:
        w2 = (t["lokr_w2_a"] @ t["lokr_w2_b"].reshape(t["lokr_w2_b"].shape[0], -1)).reshape(b, d, *k)
    return torch.kron(w1.reshape(a, c, *([1] * len(k))), w2)


def _random(t):
    return {n: torch.randn_like(v) for n, v in t.items()}


CASES = [  # (weight shape, settings)
    ((256, 128), ModuleSettings(4, 2, factor=-1)),  # low-rank w2
    ((64, 32), ModuleSettings(4, 2, factor=8, full_matrix=True)),
    ((60, 48), ModuleSettings(2, 1, factor=-1, decompose_both=True)),  # both decomposed
    ((64, 32, 1, 1), ModuleSettings(4, 4, factor=4)),
    ((64, 32, 3, 3), ModuleSettings(2, 1, factor=-1)),  # conv, 2-D low-rank w2_b
    ((64, 32, 3, 3), ModuleSettings(64, 1, factor=8)),  # conv, full 4-D w2
]


@pytest.mark.parametrize("shape,s", CASES)
def test_lokr_delta_matches_kron(shape, s):
    t = _random(lokr.init_tensors(shape, s))
    assert torch.allclose(lokr.delta_weight(t, shape), _ref_lokr(t, shape), atol=1e-5)


def test_lokr_decomposition_rules():
    t = lokr.init_tensors((256, 128), ModuleSettings(4, 2, factor=-1))  # w2 (16, 16): 4 < 16/2
    assert set(t) == {"lokr_w1", "lokr_w2_a", "lokr_w2_b"} and lokr.rank(t) == 4
    t = lokr.init_tensors((64, 32), ModuleSettings(4, 2, factor=-1))  # w2 (8, 8): 4 is not < 8/2
    assert set(t) == {"lokr_w1", "lokr_w2"}
    t = lokr.init_tensors((256, 128), ModuleSettings(4, 2, factor=-1, full_matrix=True))
    assert set(t) == {"lokr_w1", "lokr_w2"} and lokr.rank(t) is None
    t = lokr.init_tensors((320, 320, 3, 3), ModuleSettings(4, 1, factor=8))  # w2 (40, 40) -> low-rank
    assert t["lokr_w2_b"].shape == (4, 40 * 9) and t["lokr_w1"].shape == (8, 8)
    t = lokr.init_tensors((640, 640), ModuleSettings(4, 1, factor=-1, decompose_both=True))
    assert set(t) == {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}


def test_lokr_tucker_and_4d_w2b():
    shape = (12, 10, 3, 3)
    a, b, c, d, r = 3, 4, 2, 5, 2
    t = {"lokr_w1": torch.randn(a, c), "lokr_t2": torch.randn(r, r, 3, 3),
         "lokr_w2_a": torch.randn(r, b), "lokr_w2_b": torch.randn(r, d)}
    assert torch.allclose(lokr.delta_weight(t, shape), _ref_lokr(t, shape), atol=1e-5)
    t4 = {"lokr_w1": torch.randn(a, c), "lokr_w2_a": torch.randn(b, r), "lokr_w2_b": torch.randn(r, d, 3, 3)}
    assert torch.allclose(lokr.delta_weight(t4, shape), _ref_lokr(t4, shape), atol=1e-5)


def test_loha_and_lora_deltas():
    for shape in [(16, 12), (16, 12, 3, 3)]:
        t = _random(loha.init_tensors(shape, ModuleSettings(3, 3)))
        ref = ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])).reshape(shape)
        assert torch.allclose(loha.delta_weight(t, shape), ref, atol=1e-5)
        t = _random(lora.init_tensors(shape, ModuleSettings(3, 3)))
        ref = (t["lora_up.weight"].flatten(1) @ t["lora_down.weight"].flatten(1)).reshape(shape)
        assert torch.allclose(lora.delta_weight(t, shape), ref, atol=1e-5)
    # LoCon with a Tucker mid, and LoHa with Tucker cores
    mid = {"lora_down.weight": torch.randn(2, 6, 1, 1), "lora_mid.weight": torch.randn(2, 2, 3, 3),
           "lora_up.weight": torch.randn(8, 2, 1, 1)}
    conv = torch.nn.functional.conv2d
    x = torch.randn(1, 6, 7, 7)
    seq = conv(conv(conv(x, mid["lora_down.weight"]), mid["lora_mid.weight"]), mid["lora_up.weight"])  # down, mid, up
    assert torch.allclose(conv(x, lora.delta_weight(mid, (8, 6, 3, 3))), seq, atol=1e-4)
    tk = {"hada_w1_a": torch.randn(2, 8), "hada_w1_b": torch.randn(2, 6), "hada_t1": torch.randn(2, 2, 3, 3),
          "hada_w2_a": torch.randn(2, 8), "hada_w2_b": torch.randn(2, 6), "hada_t2": torch.randn(2, 2, 3, 3)}
    half = lambda wa, wb, tc: torch.einsum("ijkl,ip,jr->prkl", tc, wa, wb)  # noqa: E731
    ref = half(tk["hada_w1_a"], tk["hada_w1_b"], tk["hada_t1"]) * half(tk["hada_w2_a"], tk["hada_w2_b"], tk["hada_t2"])
    assert torch.allclose(loha.delta_weight(tk, (8, 6, 3, 3)), ref, atol=1e-4)


FORWARD_CASES = [
    (nn.Linear(256, 128), ModuleSettings(4, 1, factor=-1)),
    (nn.Linear(64, 48), ModuleSettings(4, 1, factor=8, full_matrix=True)),
    (nn.Linear(60, 40), ModuleSettings(2, 1, factor=-1, decompose_both=True)),
    (nn.Conv2d(32, 48, 1), ModuleSettings(4, 1, factor=4)),
    (nn.Conv2d(32, 48, 3, padding=1), ModuleSettings(2, 1, factor=-1)),
    (nn.Conv2d(32, 48, 3, stride=2, padding=1), ModuleSettings(64, 1, factor=8)),
]


@pytest.mark.parametrize("base,s", FORWARD_CASES)
def test_factored_forward_equals_rebuild(base, s):
    shape = tuple(base.weight.shape)
    t = _random(lokr.init_tensors(shape, s))
    x = torch.randn(2, 16, shape[1]) if isinstance(base, nn.Linear) else torch.randn(2, shape[1], 9, 9)
    fast = lokr.forward(x, t, base)
    assert fast is not None
    slow = apply_weight(x, lokr.delta_weight(t, shape), base)
    assert torch.allclose(fast, slow, rtol=1e-4, atol=1e-4), (fast - slow).abs().max()
    # LoRA's bypass path too
    tl = _random(lora.init_tensors(shape, s))
    assert torch.allclose(lora.forward(x, tl, base), apply_weight(x, lora.delta_weight(tl, shape), base), atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(out_dim=st.sampled_from([4, 6, 8, 12, 16, 20]), in_dim=st.sampled_from([4, 6, 8, 9, 12, 16]),
       factor=st.sampled_from([-1, 2, 4]), dim=st.integers(1, 6), full=st.booleans(), both=st.booleans(),
       conv=st.booleans())
def test_lokr_paths_agree_property(out_dim, in_dim, factor, dim, full, both, conv):
    base = nn.Conv2d(in_dim, out_dim, 3, padding=1) if conv else nn.Linear(in_dim, out_dim)
    shape = tuple(base.weight.shape)
    t = _random(lokr.init_tensors(shape, ModuleSettings(dim, 1, factor, full, both)))
    assert torch.allclose(lokr.delta_weight(t, shape), _ref_lokr(t, shape), atol=1e-4)
    x = torch.randn(2, in_dim, 5, 5) if conv else torch.randn(3, 7, in_dim)
    fast = lokr.forward(x, t, base)
    slow = apply_weight(x, lokr.delta_weight(t, shape), base)
    if fast is not None:
        assert torch.allclose(fast, slow, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("order", ["in", "out", "tok"])
def test_compiled_kron_linear_equals_eager_in_every_order(order):
    """The traced form torch.compile sees (each order its own layout) against the hand-written
    autograd path: output and all three gradients, fp32, within 1e-5 relative."""
    import torch._dynamo

    from lokr_diffusion.kron_autograd import kron_linear

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 6 * 5, generator=g)
    w1, w2 = torch.randn(4, 6, generator=g), torch.randn(3, 5, generator=g)
    weights = torch.randn(2, 7, 4 * 3, generator=g)

    def run(fn):
        xs, a, b = (t.clone().requires_grad_(True) for t in (x, w1, w2))
        y = fn(xs, a, b)
        (y * weights).sum().backward()
        return [y.detach(), xs.grad, a.grad, b.grad]

    eager = run(lambda xs, a, b: kron_linear(xs, a, b, order))
    dense = run(lambda xs, a, b: torch.nn.functional.linear(xs, torch.kron(a, b)))
    torch._dynamo.reset()
    compiled = run(torch.compile(lambda xs, a, b: kron_linear(xs, a, b, order), backend="aot_eager", fullgraph=True))
    torch._dynamo.reset()
    for e, c, d in zip(eager, compiled, dense):
        assert ((c - e).norm() / e.norm()).item() < 1e-5
        assert ((e - d).norm() / d.norm()).item() < 1e-5

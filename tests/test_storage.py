"""Frozen weights stored in bf16 / fp8 (`[model] base_dtype`): the forward, adapters on top."""
import pytest
import torch
from torch import nn

import torch._dynamo as dynamo

from lokr_diffusion.algos import ModuleSettings, get_algorithm
from lokr_diffusion.errors import ConfigError
from lokr_diffusion.layers import AdapterModule
from lokr_diffusion.storage import (FP8, CastConv2d, CastLinear, Fp8Linear, model_dtype, quantize_fp8,
                                    store_frozen_weights, stored_bytes)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.LayerNorm(64)
        self.a = nn.Linear(64, 96)
        self.b = nn.Linear(96, 64, bias=False)

    def forward(self, x):
        h = self.conv(x).flatten(2).transpose(1, 2).reshape(x.shape[0], -1, 64)
        return self.b(torch.nn.functional.gelu(self.a(self.norm(h))))


def _frozen():
    torch.manual_seed(0)
    return _Net().requires_grad_(False).eval()


def test_fp8_rows_use_the_whole_range():
    w = torch.randn(32, 64) * torch.logspace(-4, 1, 32).unsqueeze(1)  # rows of very different size
    q, scale = quantize_fp8(w)
    assert q.dtype == FP8 and scale.shape == (32, 1) and scale.dtype == torch.float32
    back = q.float() * scale
    rel = (back - w).abs().amax(1) / w.abs().amax(1)
    assert rel.max() < 1 / 16  # e4m3: 3 mantissa bits, relative to each row's largest entry


@pytest.mark.parametrize("name, dtype, tol", [("bf16", torch.bfloat16, 2e-2), ("fp16", torch.float16, 2e-3),
                                              ("fp8", FP8, 0.15)])
def test_stored_model_computes_like_fp32(name, dtype, tol):
    model, x = _frozen(), torch.randn(2, 3, 8, 8)
    want, full = model(x), stored_bytes(model)
    changed = store_frozen_weights(model, dtype)
    assert changed == (2 if dtype == FP8 else 3)  # fp8: Linears only
    assert isinstance(model.a, Fp8Linear if dtype == FP8 else CastLinear)
    assert isinstance(model.conv, nn.Conv2d) and isinstance(model.conv, CastConv2d) == (dtype != FP8)
    assert model.a.weight.dtype == dtype and model.norm.weight.dtype == torch.float32
    assert model_dtype(model) == torch.float32
    assert stored_bytes(model) < full
    got = model(x)
    assert got.dtype == torch.float32
    assert ((got - want).norm() / want.norm()).item() < tol


def _adapt(model, algo="lokr"):
    alg = get_algorithm(algo)
    out = []
    for name in ("a", "b"):
        base = getattr(model, name)
        tensors = alg.init_tensors(tuple(base.weight.shape), ModuleSettings(dim=4, alpha=2, factor=4))
        a = AdapterModule(name, base, alg, tensors, alpha=2.0)
        a.attach()
        with torch.no_grad():
            for p in a.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        out.append(a)
    return out


@pytest.mark.parametrize("algo", ["lokr", "lora"])
def test_adapters_add_their_output_to_an_fp8_base(algo):
    """Training and inference both add the adapter's output to the widened fp8 layer's, and the
    adapter's gradients equal those on the fp32 model with the widened weights."""
    model, x = _frozen(), torch.randn(2, 3, 8, 8)
    store_frozen_weights(model, FP8)
    reference = _frozen()
    with torch.no_grad():  # the same frozen weights, dense fp32
        for name in ("a", "b"):
            getattr(reference, name).weight.copy_(getattr(model, name).dense_weight(torch.float32))
    torch.manual_seed(1)
    ours = _adapt(model, algo)
    torch.manual_seed(1)
    theirs = _adapt(reference, algo)
    model(x).square().mean().backward()
    reference(x).square().mean().backward()
    for a, b in zip(ours, theirs):
        for p, q in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-6)
    assert model.a.weight.dtype == FP8  # no patched copy was made
    with pytest.raises(ConfigError, match="^a: cannot fuse into a base weight stored in fp8"):
        ours[0].merge()


def test_adapters_merge_into_a_bf16_stored_base():
    model = _frozen()
    store_frozen_weights(model, torch.bfloat16)
    a = _adapt(model)[0]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = model(x)
        a.merge()
        assert a.merged and model.a.weight.dtype == torch.bfloat16
        torch.testing.assert_close(model(x), before, rtol=2e-2, atol=2e-2)


def test_fp8_base_with_adapters_compiles_without_breaks():
    model = _frozen()
    store_frozen_weights(model, FP8)
    _adapt(model)
    x = torch.randn(2, 3, 8, 8)
    dynamo.reset()
    try:
        assert dynamo.explain(model)(x).graph_break_count == 0
        with torch.no_grad():
            assert dynamo.explain(model)(x).graph_break_count == 0
    finally:
        dynamo.reset()


@pytest.mark.parametrize("dtype", [torch.bfloat16, FP8])
def test_backward_keeps_no_widened_weight(dtype):
    """Gradients through a stored layer equal the dense layer's, and what autograd keeps for the
    backward pass is the input, not an fp32 copy of the weight."""
    torch.manual_seed(0)
    layer = nn.Linear(256, 512).requires_grad_(False)
    conv = nn.Conv2d(4, 8, 3, padding=1).requires_grad_(False)
    from lokr_diffusion.storage import store_layer
    store_layer(layer, dtype)
    dense = nn.Linear(256, 512).requires_grad_(False)
    with torch.no_grad():
        dense.weight.copy_(layer.dense_weight(torch.float32))
        dense.bias.copy_(layer.bias)
    x = torch.randn(3, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = layer(x)
    assert max(saved, default=0) < 512 * 256
    y.square().sum().backward()
    gx, x.grad = x.grad, None
    dense(x).square().sum().backward()
    torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-6)
    if dtype != FP8:
        ref = nn.Conv2d(4, 8, 3, padding=1).requires_grad_(False)
        store_layer(conv, dtype)
        with torch.no_grad():
            ref.weight.copy_(conv.dense_weight(torch.float32))
            ref.bias.copy_(conv.bias)
        xc = torch.randn(2, 4, 6, 6, requires_grad=True)
        conv(xc).square().sum().backward()
        g1, xc.grad = xc.grad, None
        ref(xc).square().sum().backward()
        torch.testing.assert_close(g1, xc.grad, rtol=1e-5, atol=1e-6)

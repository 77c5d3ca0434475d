"""Frozen base weights stored narrower than they compute: `[model] base_dtype`.

A trained adapter only needs the frozen model's outputs, so its weights can sit in memory in a
small format and be widened one layer at a time, inside that layer's forward:

- ``bf16`` / ``fp16`` with a wider compute dtype (fp32 training, no mixed precision): each frozen
  nn.Linear and nn.Conv2d keeps its weight in that dtype and casts it to the compute dtype per
  call (`CastLinear`, `CastConv2d`). With mixed precision in that same dtype the whole model is
  simply stored in it, as before.
- ``fp8``: each frozen nn.Linear keeps its weight as ``float8_e4m3fn`` with one float32 scale
  per output row (`Fp8Linear`), max |row| / 448, so every row uses the format's whole range;
  the forward widens it to the compute dtype and multiplies by the scale. Pure PyTorch, runs on
  the CPU too. Convolutions, norms and embeddings (a small share of a DiT) stay in the compute
  dtype.

The compute dtype is the autocast dtype where autocast is on, else the input's. Adapters attach
to these layers as to any nn.Linear / nn.Conv2d (they are subclasses) and always add their
output to the layer's; they are never merged into an fp8 weight (`AdapterModule.merge` refuses).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BASE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype `model` computes in: its first floating-point parameter's, stored weights left
    out (the families cast inputs to it; `next(model.parameters()).dtype` could be fp8)."""
    for m in model.modules():
        for name, p in m._parameters.items():
            if p is not None and p.is_floating_point() and not (isinstance(m, StoredLayer) and name == "weight"):
                return p.dtype
    return torch.float32


class StoredLayer:
    """A frozen layer whose weight is stored in another dtype than it computes in.

    `dense_weight(dtype)` is the weight as the forward uses it. Adapters on such a layer add
    their output rather than patching a copy of the weight (that copy would cost the memory
    the storage saves)."""

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError


class _WidenedOp(torch.autograd.Function):
    """`layer`'s op on x with its weight widened to `dtype`, the widened copy not kept for the
    backward pass (autograd would keep one per layer: the whole model at full width); the
    backward widens the stored weight again. The frozen weight and bias get no gradient."""

    @staticmethod
    def forward(ctx, x, layer, dtype):
        ctx.layer, ctx.dtype, ctx.x_shape = layer, dtype, x.shape
        w = layer.dense_weight(dtype)
        bias = None if layer.bias is None else layer.bias.to(dtype)
        if isinstance(layer, nn.Conv2d):
            return layer._conv_forward(x, w, bias)
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, g):
        layer = ctx.layer
        w = layer.dense_weight(ctx.dtype)
        if isinstance(layer, nn.Conv2d):
            gx = torch.nn.grad.conv2d_input(ctx.x_shape, w, g, layer.stride, layer.padding, layer.dilation,
                                            layer.groups)
        else:
            gx = g @ w
        return gx, None, None


def _widened(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    dtype = compute_dtype(x)
    plain_conv = isinstance(layer, nn.Conv2d) and (layer.padding_mode != "zeros" or isinstance(layer.padding, str))
    if torch.is_grad_enabled() and x.requires_grad and not plain_conv and not torch.compiler.is_compiling():
        return _WidenedOp.apply(x, layer, dtype)
    # no backward to feed (or the compiler plans what to keep): the plain op
    w = layer.dense_weight(dtype)
    bias = None if layer.bias is None else layer.bias.to(dtype)
    return layer._conv_forward(x, w, bias) if isinstance(layer, nn.Conv2d) else F.linear(x, w, bias)


class CastLinear(nn.Linear, StoredLayer):
    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _widened(self, x)


class CastConv2d(nn.Conv2d, StoredLayer):
    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _widened(self, x)


class Fp8Linear(nn.Linear, StoredLayer):
    """`weight` is float8_e4m3fn (out, in); `weight_scale` float32 (out, 1): W = weight * scale."""

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        # one transient float32 copy, scaled in place (a product would briefly make two)
        w = self.weight.float()
        return w.mul_(self.weight_scale).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _widened(self, x)


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 per-row scale) with weight * scale ~= the input."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def storable(module: nn.Module, fp8: bool) -> bool:
    """Whether `store_layer` stores this layer's weight: plain nn.Linear, and for bf16/fp16 also
    plain nn.Conv2d (fp8 keeps convolutions in the compute dtype)."""
    return type(module) is nn.Linear or (type(module) is nn.Conv2d and not fp8)


def store_layer(module: nn.Module, dtype: torch.dtype) -> bool:
    """Turn one plain frozen nn.Linear (or, for bf16/fp16, nn.Conv2d) into its stored form in
    `dtype`, in place (same object, hooks and geometry; its class becomes the subclass that
    widens the weight per call). False, unchanged, for any other module."""
    if not storable(module, dtype == FP8):
        return False
    if type(module) is nn.Linear:
        cls = Fp8Linear if dtype == FP8 else CastLinear
    else:
        cls = CastConv2d
    if dtype == FP8:
        q, scale = quantize_fp8(module.weight)
        module.weight = nn.Parameter(q, requires_grad=False)
        module.register_buffer("weight_scale", scale)
    else:
        module.weight = nn.Parameter(module.weight.detach().to(dtype), requires_grad=False)
    module.__class__ = cls
    return True


def store_frozen_weights(model: nn.Module, dtype: torch.dtype) -> int:
    """Store every plain nn.Linear (and, for bf16/fp16, nn.Conv2d) of `model` in `dtype`, one
    layer at a time (the peak is the model plus one layer). Returns how many layers changed.
    Call it on the frozen model before adapters attach."""
    layers = [m for m in model.modules() if "_lokr_dispatch" not in m.__dict__]
    return sum(store_layer(m, dtype) for m in layers)


def stored_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer: what the model holds in memory."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


__all__ = ["BASE_DTYPES", "CastConv2d", "CastLinear", "Fp8Linear", "StoredLayer", "compute_dtype", "model_dtype",
           "quantize_fp8", "store_frozen_weights", "store_layer", "stored_bytes"]

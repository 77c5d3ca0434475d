"""LoHa: dW = (w1_a @ w1_b) * (w2_a @ w2_b), a Hadamard product of two low-rank matrices.

Provides the `Algorithm` protocol (algos/common.py).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .common import FoldedUpdate, ModuleSettings, tucker_applies, weight_dims

NAME = "loha"
TENSOR_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


def detect(names: set[str]) -> bool:
    """Both low-rank pairs present (the Tucker cores are optional)."""
    return {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= names


def init_tensors(weight_shape: tuple[int, ...], settings: ModuleSettings) -> dict[str, torch.Tensor]:
    """LyCORIS initialisation: w2_a zero, so the product (and dW) starts at exactly 0 (with
    `use_scalar` w2_a is normal(0.1) like w1_a: the module's scalar holds dW at 0).

    With `use_tucker` on a k x k conv each half is a Tucker product as LyCORIS writes it:
    cores hada_t1, hada_t2 (r, r, kh, kw) and factors hada_wi_a (r, out), hada_wi_b (r, in).
    """
    out_dim, in_dim, kernel = weight_dims(weight_shape)
    k = math.prod(kernel)
    r = settings.dim
    if tucker_applies(settings, kernel):
        return {
            "hada_t1": torch.randn(r, r, *kernel) * 0.1,
            "hada_w1_a": torch.randn(r, out_dim) * 0.1,
            "hada_w1_b": torch.randn(r, in_dim),
            "hada_t2": torch.randn(r, r, *kernel) * 0.1,
            "hada_w2_a": torch.randn(r, out_dim) * 0.1 if settings.use_scalar else torch.zeros(r, out_dim),
            "hada_w2_b": torch.randn(r, in_dim),
        }
    return {
        "hada_w1_a": torch.randn(out_dim, r) * 0.1,
        "hada_w1_b": torch.randn(r, in_dim * k),
        "hada_w2_a": torch.randn(out_dim, r) * 0.1 if settings.use_scalar else torch.zeros(out_dim, r),
        "hada_w2_b": torch.randn(r, in_dim * k),
    }


def _half(t: dict[str, torch.Tensor], i: int) -> torch.Tensor:
    wa, wb = t[f"hada_w{i}_a"], t[f"hada_w{i}_b"]
    core = t.get(f"hada_t{i}")
    if core is not None:  # Tucker: wa (r, out), wb (r, in)
        return torch.einsum("ijkl,jr,ip->prkl", core, wb, wa)
    return wa @ wb


def delta_weight(tensors: dict[str, torch.Tensor], weight_shape: tuple[int, ...]) -> torch.Tensor:
    """The Hadamard product of the two halves, reshaped to the base weight."""
    w1, w2 = _half(tensors, 1), _half(tensors, 2)
    return (w1 * w2).reshape(weight_shape)


def rank(tensors: dict[str, torch.Tensor]) -> int | None:
    """w1_b's rank, as LyCORIS scales LoHa."""
    return int(tensors["hada_w1_b"].shape[0])


def forward(x: torch.Tensor, tensors: dict[str, torch.Tensor], base: nn.Module,
            scale: float | torch.Tensor | None = None, fold: bool = False) -> torch.Tensor | FoldedUpdate | None:
    """Always None: a Hadamard product has no cheaper form than the rebuilt weight."""
    return None

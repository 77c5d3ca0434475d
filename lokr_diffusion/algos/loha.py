"""LoHa: dW = (w1_a @ w1_b) * (w2_a @ w2_b), a Hadamard product of two low-rank matrices."""
from __future__ import annotations

import torch
from torch import nn

from .common import ModuleSettings, weight_dims

NAME = "loha"
TENSOR_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


def detect(names: set[str]) -> bool:
    return {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= names


def init_tensors(weight_shape: tuple[int, ...], s: ModuleSettings) -> dict[str, torch.Tensor]:
    """LyCORIS initialisation: w2_a zero, so the product (and dW) starts at exactly 0."""
    out_dim, in_dim, kernel = weight_dims(weight_shape)
    k = 1
    for size in kernel:
        k *= size
    r = s.dim
    return {
        "hada_w1_a": torch.randn(out_dim, r) * 0.1,
        "hada_w1_b": torch.randn(r, in_dim * k),
        "hada_w2_a": torch.zeros(out_dim, r),
        "hada_w2_b": torch.randn(r, in_dim * k),
    }


def _half(t: dict[str, torch.Tensor], i: int) -> torch.Tensor:
    wa, wb = t[f"hada_w{i}_a"], t[f"hada_w{i}_b"]
    core = t.get(f"hada_t{i}")
    if core is not None:  # Tucker: wa (r, out), wb (r, in)
        return torch.einsum("ijkl,jr,ip->prkl", core, wb, wa)
    return wa @ wb


def delta_weight(t: dict[str, torch.Tensor], weight_shape: tuple[int, ...]) -> torch.Tensor:
    w1, w2 = _half(t, 1), _half(t, 2)
    return (w1 * w2).reshape(weight_shape)


def rank(t: dict[str, torch.Tensor]) -> int | None:
    return int(t["hada_w1_b"].shape[0])


def forward(x: torch.Tensor, t: dict[str, torch.Tensor], base: nn.Module) -> torch.Tensor | None:
    return None  # a Hadamard product has no cheaper form than the rebuilt weight

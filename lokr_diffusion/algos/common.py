"""Helpers every algorithm shares: applying a delta weight the way the base layer would."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def apply_weight(x: torch.Tensor, weight: torch.Tensor, base: nn.Module) -> torch.Tensor:
    """Run `x` through a weight of the base layer's kind (no bias), with its conv geometry."""
    if isinstance(base, nn.Conv2d):
        return F.conv2d(x, weight, None, base.stride, base.padding, base.dilation, base.groups)
    return F.linear(x, weight)


def kaiming_(t: torch.Tensor) -> torch.Tensor:
    """Kaiming-uniform with a = sqrt(5): nn.Linear's default, which LyCORIS uses for its factors."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def weight_dims(weight_shape: tuple[int, ...]) -> tuple[int, int, tuple[int, ...]]:
    """(out, in, kernel) of a Linear (out, in) or Conv2d (out, in, kh, kw) weight shape."""
    out_dim, in_dim = int(weight_shape[0]), int(weight_shape[1])
    return out_dim, in_dim, tuple(int(k) for k in weight_shape[2:])


class ModuleSettings:
    """The settings one wrapped layer is built from (linear or conv values already chosen)."""

    __slots__ = ("dim", "alpha", "factor", "full_matrix", "decompose_both")

    def __init__(self, dim: int, alpha: float, factor: int = -1, full_matrix: bool = False,
                 decompose_both: bool = False) -> None:
        self.dim, self.alpha, self.factor = int(dim), float(alpha), int(factor)
        self.full_matrix, self.decompose_both = bool(full_matrix), bool(decompose_both)

    def __repr__(self) -> str:
        return (f"ModuleSettings(dim={self.dim}, alpha={self.alpha}, factor={self.factor}, "
                f"full_matrix={self.full_matrix}, decompose_both={self.decompose_both})")

"""LoRA / LoCon: dW = up @ down (conv: down carries the kernel, up is 1x1; optional Tucker mid).

Provides the `Algorithm` protocol (algos/common.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import ModuleSettings, kaiming_, weight_dims

NAME = "lora"
TENSOR_NAMES = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")


def detect(names: set[str]) -> bool:
    """down and up present (mid is optional)."""
    return {"lora_down.weight", "lora_up.weight"} <= names


def init_tensors(weight_shape: tuple[int, ...], settings: ModuleSettings) -> dict[str, torch.Tensor]:
    """down Kaiming, up zero: the update starts at exactly 0 (with `use_scalar` up is Kaiming
    too and the module's scalar holds the update at 0)."""
    out_dim, in_dim, kernel = weight_dims(weight_shape)
    r = settings.dim
    ones = (1,) * len(kernel)
    return {
        "lora_down.weight": kaiming_(torch.empty(r, in_dim, *kernel)),
        "lora_up.weight": (kaiming_(torch.empty(out_dim, r, *ones)) if settings.use_scalar
                           else torch.zeros(out_dim, r, *ones)),
    }


def delta_weight(tensors: dict[str, torch.Tensor], weight_shape: tuple[int, ...]) -> torch.Tensor:
    """up @ down (through the Tucker mid when present), reshaped to the base weight."""
    up, down = tensors["lora_up.weight"].flatten(1), tensors["lora_down.weight"].flatten(1)
    mid = tensors.get("lora_mid.weight")
    if mid is not None:
        return torch.einsum("ijkl,jr,pi->prkl", mid, down, up).reshape(weight_shape)
    return (up @ down).reshape(weight_shape)


def rank(tensors: dict[str, torch.Tensor]) -> int | None:
    """down's output channels."""
    return int(tensors["lora_down.weight"].shape[0])


def forward(x: torch.Tensor, tensors: dict[str, torch.Tensor], base: nn.Module,
            scale: float | torch.Tensor | None = None) -> torch.Tensor | None:
    """Bypass path down -> up, never forming the (out, in) matrix; the result times `scale`
    when given. None for a Tucker mid on a conv or unexpected tensor ranks."""
    down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
    if isinstance(base, nn.Conv2d):
        if "lora_mid.weight" in tensors or down.dim() != 4 or up.dim() != 4:
            return None
        h = F.conv2d(x, down, None, base.stride, base.padding, base.dilation, base.groups)
        y = F.conv2d(h, up)
    else:
        if down.dim() != 2 or up.dim() != 2:
            return None
        y = F.linear(F.linear(x, down), up)
    return y if scale is None else y * scale

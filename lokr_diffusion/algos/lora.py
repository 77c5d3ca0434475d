"""LoRA / LoCon: dW = up @ down (conv: down carries the kernel, up is 1x1; optional Tucker mid).

Provides the `Algorithm` protocol (algos/common.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import FoldedUpdate, ModuleSettings, kaiming_, tucker_applies, weight_dims

NAME = "lora"
TENSOR_NAMES = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")


def detect(names: set[str]) -> bool:
    """down and up present (mid is optional)."""
    return {"lora_down.weight", "lora_up.weight"} <= names


def init_tensors(weight_shape: tuple[int, ...], settings: ModuleSettings) -> dict[str, torch.Tensor]:
    """down Kaiming, up zero: the update starts at exactly 0 (with `use_scalar` up is Kaiming
    too and the module's scalar holds the update at 0).

    With `use_tucker` on a k x k conv (LoCon), down is a 1x1 conv (r, in, 1, 1), the kernel sits
    in a core lora_mid (r, r, kh, kw) (Kaiming), as LyCORIS writes it.
    """
    out_dim, in_dim, kernel = weight_dims(weight_shape)
    r = settings.dim
    ones = (1,) * len(kernel)
    if tucker_applies(settings, kernel):
        return {
            "lora_down.weight": kaiming_(torch.empty(r, in_dim, *ones)),
            "lora_mid.weight": kaiming_(torch.empty(r, r, *kernel)),
            "lora_up.weight": (kaiming_(torch.empty(out_dim, r, *ones)) if settings.use_scalar
                               else torch.zeros(out_dim, r, *ones)),
        }
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
            scale: float | torch.Tensor | None = None, fold: bool = False) -> torch.Tensor | FoldedUpdate | None:
    """Bypass path down [-> mid] -> up, never forming the (out, in) matrix; the result times
    `scale` when given. None for unexpected tensor ranks or a grouped conv with a Tucker mid."""
    down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
    mid = tensors.get("lora_mid.weight")
    if isinstance(base, nn.Conv2d):
        if down.dim() != 4 or up.dim() != 4:
            return None
        if mid is not None:  # Tucker: 1x1 down, the layer's geometry on the core, 1x1 up
            if base.groups != 1 or down.shape[2:] != (1, 1):
                return None
            h = F.conv2d(F.conv2d(x, down), mid, None, base.stride, base.padding, base.dilation)
        else:
            h = F.conv2d(x, down, None, base.stride, base.padding, base.dilation, base.groups)
        y = F.conv2d(h, up)
    else:
        if down.dim() != 2 or up.dim() != 2:
            return None
        y = F.linear(F.linear(x, down), up)
    return y if scale is None else y * scale

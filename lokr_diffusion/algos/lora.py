"""LoRA / LoCon: dW = up @ down (conv: down carries the kernel, up is 1x1; optional Tucker mid)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import ModuleSettings, kaiming_, weight_dims

NAME = "lora"
TENSOR_NAMES = ("lora_down.weight", "lora_up.weight", "lora_mid.weight")


def detect(names: set[str]) -> bool:
    return {"lora_down.weight", "lora_up.weight"} <= names


def init_tensors(weight_shape: tuple[int, ...], s: ModuleSettings) -> dict[str, torch.Tensor]:
    """down Kaiming, up zero: the update starts at exactly 0."""
    out_dim, in_dim, kernel = weight_dims(weight_shape)
    r = s.dim
    ones = (1,) * len(kernel)
    return {
        "lora_down.weight": kaiming_(torch.empty(r, in_dim, *kernel)),
        "lora_up.weight": torch.zeros(out_dim, r, *ones),
    }


def delta_weight(t: dict[str, torch.Tensor], weight_shape: tuple[int, ...]) -> torch.Tensor:
    up, down = t["lora_up.weight"].flatten(1), t["lora_down.weight"].flatten(1)
    mid = t.get("lora_mid.weight")
    if mid is not None:
        return torch.einsum("ijkl,jr,pi->prkl", mid, down, up).reshape(weight_shape)
    return (up @ down).reshape(weight_shape)


def rank(t: dict[str, torch.Tensor]) -> int | None:
    return int(t["lora_down.weight"].shape[0])


def forward(x: torch.Tensor, t: dict[str, torch.Tensor], base: nn.Module) -> torch.Tensor | None:
    """Bypass path down -> (mid) -> up: never forms the (out, in) matrix."""
    down, up = t["lora_down.weight"], t["lora_up.weight"]
    if isinstance(base, nn.Conv2d):
        if "lora_mid.weight" in t or down.dim() != 4 or up.dim() != 4:
            return None
        h = F.conv2d(x, down, None, base.stride, base.padding, base.dilation, base.groups)
        return F.conv2d(h, up)
    if down.dim() != 2 or up.dim() != 2:
        return None
    return F.linear(F.linear(x, down), up)

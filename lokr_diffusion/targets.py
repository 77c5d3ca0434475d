"""Which layers of a denoiser / CLIP text encoder an adapter trains: presets and patterns.

Presets follow LyCORIS: attn-only (attention projections), attn-mlp (every Linear / 1x1 conv
inside transformer blocks + CLIP attention and MLP), full (attn-mlp + convs). What each preset
picks in a denoiser is the family's (``Family.preset_filter``); text encoders are CLIP for
every family so far, and their rule lives here.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from .families import Family

PRESETS = ("attn-only", "attn-mlp", "full")

_TE_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
_TE_MLP = ("mlp.fc1", "mlp.fc2")


@dataclass(frozen=True)
class Target:
    component: str  # "unet", "te", "te1", "te2"
    path: str  # module path inside that component
    module: nn.Module

    @property
    def is_kxk_conv(self) -> bool:
        return isinstance(self.module, nn.Conv2d) and tuple(self.module.kernel_size) != (1, 1)


def _in_te_preset(path: str, preset: str) -> bool:
    if path.endswith(_TE_ATTN):
        return True
    return preset != "attn-only" and path.endswith(_TE_MLP)


def _matches(patterns: tuple[str, ...], path: str, key: str) -> bool:
    return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(key, p) for p in patterns)


def select_targets(component: str, model: nn.Module, preset: str, key_of, include: tuple[str, ...] = (),
                   exclude: tuple[str, ...] = (), family: Family | None = None) -> list[Target]:
    """Linear / Conv2d layers of `model` the preset picks, plus `include`, minus `exclude`.

    Patterns are shell globs matched against both the module path and the file key.
    `key_of(path)` gives a path's file key, so `lora_unet_*attn2*` works as users expect.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    in_unet_preset = family.preset_filter(model, preset) if component == "unet" else None
    found = []
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        key = key_of(path)
        if component == "unet":
            chosen = in_unet_preset(path)
        else:
            chosen = _in_te_preset(path, preset)
        if include and _matches(include, path, key):
            chosen = True
        if exclude and _matches(exclude, path, key):
            chosen = False
        if chosen:
            found.append(Target(component, path, module))
    return found

"""Which layers of a denoiser / CLIP text encoder an adapter trains: presets and patterns.

Presets follow LyCORIS: attn-only (attention projections), attn-mlp (every Linear / 1x1 conv
inside transformer blocks + CLIP attention and MLP), full (attn-mlp + convs). What each preset
picks is the family's: ``Family.preset_filter`` for the denoiser, ``Family.text_preset_filter``
for each text encoder (CLIP by default, T5 for Flux).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from .families import Family
from .families.base import clip_preset_filter

PRESETS = ("attn-only", "attn-mlp", "full")


@dataclass(frozen=True)
class Target:
    component: str  # "unet", "te", "te1", "te2"
    path: str  # module path inside that component
    module: nn.Module

    @property
    def is_kxk_conv(self) -> bool:
        return isinstance(self.module, nn.Conv2d) and tuple(self.module.kernel_size) != (1, 1)


def _matches(patterns: tuple[str, ...], path: str, key: str) -> bool:
    return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(key, p) for p in patterns)


def _text_encoder_index(component: str) -> int:
    """``te`` -> 0, ``te1`` -> 0, ``te2`` -> 1: the family's text-encoder order."""
    return int(component[2:]) - 1 if component[2:].isdigit() else 0


def select_targets(component: str, model: nn.Module, preset: str, key_of, include: tuple[str, ...] = (),
                   exclude: tuple[str, ...] = (), family: Family | None = None) -> list[Target]:
    """Linear / Conv2d layers of `model` the preset picks, plus `include`, minus `exclude`.

    ``component`` is ``unet`` (the denoiser) or a text encoder's (``te``, ``te1``, ``te2``...);
    the family says what the preset picks in each. Without a family, text encoders follow the
    CLIP rule. Patterns are shell globs matched against both the module path and the file key.
    `key_of(path)` gives a path's file key, so `lora_unet_*attn2*` works as users expect.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    if component == "unet":
        in_preset = family.preset_filter(model, preset)
    elif family is not None:
        in_preset = family.text_preset_filter(_text_encoder_index(component), model, preset)
    else:
        in_preset = clip_preset_filter(preset)
    found = []
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        key = key_of(path)
        chosen = in_preset(path)
        if include and _matches(include, path, key):
            chosen = True
        if exclude and _matches(exclude, path, key):
            chosen = False
        if chosen:
            found.append(Target(component, path, module))
    return found

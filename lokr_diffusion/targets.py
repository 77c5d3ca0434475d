"""Which layers of a UNet / CLIP text encoder an adapter trains: presets and patterns.

Presets follow LyCORIS: attn-only (attention projections), attn-mlp (every Linear / 1x1 conv
inside transformer blocks + CLIP attention and MLP), full (attn-mlp + the ResNet, down- and
upsampler convs, and for SD1/SD2 conv_in, conv_out and the time embedding).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

PRESETS = ("attn-only", "attn-mlp", "full")

_ATTN_PROJ = (".to_q", ".to_k", ".to_v", ".to_out.0")
_TE_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
_TE_MLP = ("mlp.fc1", "mlp.fc2")
_RESNET_LAYERS = ("conv1", "conv2", "time_emb_proj", "conv_shortcut")
_SD12_TOP = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")


@dataclass(frozen=True)
class Target:
    component: str  # "unet", "te", "te1", "te2"
    path: str  # module path inside that component
    module: nn.Module

    @property
    def is_kxk_conv(self) -> bool:
        return isinstance(self.module, nn.Conv2d) and tuple(self.module.kernel_size) != (1, 1)


def _transformer_prefixes(unet: nn.Module) -> list[str]:
    return [name + "." for name, m in unet.named_modules() if type(m).__name__ == "Transformer2DModel"]


def _in_unet_preset(path: str, preset: str, transformer_prefixes: list[str], sdxl: bool) -> bool:
    in_transformer = any(path.startswith(p) for p in transformer_prefixes)
    if in_transformer:
        if preset == "attn-only":
            return (".attn1." in path or ".attn2." in path) and path.endswith(_ATTN_PROJ)
        return True
    if preset != "full":
        return False
    parts = path.split(".")
    if ".resnets." in path and parts[-1] in _RESNET_LAYERS:
        return True
    if (".downsamplers." in path or ".upsamplers." in path) and parts[-1] == "conv":
        return True
    return not sdxl and path in _SD12_TOP


def _in_te_preset(path: str, preset: str) -> bool:
    if path.endswith(_TE_ATTN):
        return True
    return preset != "attn-only" and path.endswith(_TE_MLP)


def _matches(patterns: tuple[str, ...], path: str, key: str) -> bool:
    return any(fnmatch.fnmatchcase(path, p) or fnmatch.fnmatchcase(key, p) for p in patterns)


def select_targets(component: str, model: nn.Module, preset: str, key_of, include: tuple[str, ...] = (),
                   exclude: tuple[str, ...] = (), sdxl: bool = False) -> list[Target]:
    """Linear / Conv2d layers of `model` the preset picks, plus `include`, minus `exclude`.

    Patterns are shell globs matched against both the module path and the file key.
    `key_of(path)` gives a path's file key, so `lora_unet_*attn2*` works as users expect.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    tp = _transformer_prefixes(model) if component == "unet" else []
    found = []
    for path, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        key = key_of(path)
        if component == "unet":
            chosen = _in_unet_preset(path, preset, tp, sdxl)
        else:
            chosen = _in_te_preset(path, preset)
        if include and _matches(include, path, key):
            chosen = True
        if exclude and _matches(exclude, path, key):
            chosen = False
        if chosen:
            found.append(Target(component, path, module))
    return found

"""File keys of any accepted style -> the sd-scripts keys, without loading a model.

The alias table of `loading.build_alias_table` built on the weightless real architecture
(`Family.build_meta`) knows every key style readers accept (diffusers / ldm / `lycoris_`
UNet names, text-encoder names with or without `text_model_`) and the one the exporter
writes. Tiny test models share the real module names, so one table serves both. A file that
fits several families (SD 1.x or 2.x) uses its `FileFamily.naming_family`, whose names cover
the others'.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError
from ..families import FAMILIES, Family, FileFamily, get_family
from ..loading import build_alias_table
from ..targets import Target


def alias_table(family: Family | str) -> dict[str, tuple[Target, str]]:
    """Every accepted key of `family` -> (module on the meta model, the key sd-scripts writes)."""
    return _alias_table(get_family(family))


@functools.lru_cache(maxsize=None)
def _meta(family: Family) -> tuple[nn.Module, list[nn.Module]]:
    """The family's real architecture without weights, built once: it takes a while for SDXL."""
    return family.build_meta()


@functools.lru_cache(maxsize=None)
def _alias_table(family: Family) -> dict[str, tuple[Target, str]]:
    unet, encoders = _meta(family)
    return build_alias_table(unet, encoders, family)


@dataclass(frozen=True)
class FusedLayer:
    """One fused layer of the original model that the Diffusers model splits (Flux's
    ``img_attn.qkv``, ``linear1``), at the real model's widths."""

    keys: tuple[str, ...]  # the file keys naming it, one per layout with original names
    slices: tuple[tuple[str, int, int], ...]  # (key we write for the Diffusers layer, row start, row stop)

    @property
    def rows(self) -> int:
        return max(stop for _, _, stop in self.slices)

    @property
    def members(self) -> tuple[str, ...]:
        """The Diffusers layers' keys, each once, in row order of their first slice."""
        return tuple(dict.fromkeys(key for key, _, _ in self.slices))


def fused_table(family: Family | str) -> dict[str, FusedLayer]:
    """Every file key of a fused original layer (``Family.fused_groups`` on the real
    architecture) -> the layer; the keys of one layer in different layouts share one object."""
    return _fused_table(get_family(family))


@functools.lru_cache(maxsize=None)
def _fused_table(family: Family) -> dict[str, FusedLayer]:
    denoiser = _meta(family)[0]
    keys_by_slices: dict[tuple[tuple[str, int, int], ...], list[str]] = {}
    for key, slices in family.fused_groups(denoiser).items():
        canonical = tuple((family.denoiser_key(path, denoiser), start, stop) for path, start, stop in slices)
        keys_by_slices.setdefault(canonical, []).append(key)
    table = {}
    for slices, keys in keys_by_slices.items():
        layer = FusedLayer(tuple(keys), slices)
        table.update(dict.fromkeys(keys, layer))
    return table


def canonical_key(family: Family, key: str) -> str | None:
    hit = alias_table(family).get(key)
    return hit[1] if hit else None


def module_of(family: Family, key: str) -> Target | None:
    """The meta-model module behind a key: its component, diffusers path and layer type."""
    hit = alias_table(family).get(key)
    return hit[0] if hit else None


def require_family(found: FileFamily, source: str) -> FileFamily:
    """`found`, unless the file names no family at all: keys cannot be mapped without one."""
    if not found.candidates:
        names = [f.name for f in FAMILIES]
        raise ConfigError(f"{source}: cannot tell the model family from the keys or the metadata; "
                          f"pass --family {', '.join(names[:-1])} or {names[-1]}")
    return found

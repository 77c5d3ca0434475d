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

from ..errors import ConfigError
from ..families import FAMILIES, Family, FileFamily, get_family
from ..loading import build_alias_table
from ..targets import Target


def alias_table(family: Family | str) -> dict[str, tuple[Target, str]]:
    """Every accepted key of `family` -> (module on the meta model, the key sd-scripts writes)."""
    return _alias_table(get_family(family))


@functools.lru_cache(maxsize=None)
def _alias_table(family: Family) -> dict[str, tuple[Target, str]]:
    """Built once per family: the meta build and the walk over every module take a while for SDXL."""
    unet, encoders = family.build_meta()
    return build_alias_table(unet, encoders, family)


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

"""File keys of any accepted style -> the sd-scripts keys, without loading a model.

The alias table of `loading.build_alias_table` built on the weightless real architecture
(`models.build_meta_models`) knows every key style readers accept (diffusers / ldm /
`lycoris_` UNet names, text-encoder names with or without `text_model_`) and the one the
exporter writes. Tiny test models share the real module names, so one table serves both.
"""
from __future__ import annotations

import functools

from ..errors import ConfigError
from ..loading import build_alias_table
from ..families import SD2, Family, get_family
from ..targets import Target


def meta_family(family: str) -> Family:
    """The real architecture whose names cover `family`: 'sd' (SD1 or SD2) uses SD2, whose
    23-layer text encoder names include SD1's 12 and whose UNet names are the same."""
    return SD2 if family == "sd" else get_family(family)


@functools.lru_cache(maxsize=3)
def alias_table(family: str) -> dict[str, tuple[Target, str]]:
    """Every accepted key of `family` -> (module on the meta model, the key sd-scripts writes)."""
    fam = meta_family(family)
    unet, encoders = fam.build_meta()
    return build_alias_table(unet, encoders, fam)


def canonical_key(family: str, key: str) -> str | None:
    hit = alias_table(family).get(key)
    return hit[1] if hit else None


def module_of(family: str, key: str) -> Target | None:
    """The meta-model module behind a key: its component, diffusers path and layer type."""
    hit = alias_table(family).get(key)
    return hit[0] if hit else None


def require_family(family: str | None, source: str) -> str:
    if family is None:
        raise ConfigError(f"{source}: cannot tell the model family from the keys or the metadata; "
                          "pass --family sd15, sd2 or sdxl")
    return family

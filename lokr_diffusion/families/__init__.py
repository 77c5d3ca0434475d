"""The model families and how to tell which one a model, a checkpoint or an adapter file is.

Each family lives in its own module (``sd1.py``, ``sd2.py``, ``sdxl.py``, ``flux.py``, ``sd3.py``; the
loading-only ``flux2.py``, ``qwen_image.py``, ``z_image.py``) as a
:class:`~lokr_diffusion.families.base.Family`; this registry is the only place that lists
them. Detection asks each family in turn whether the evidence is its own; an adapter file goes to
the families naming the most of its keys (``Family.names_adapter_key``), told apart by widths
(``Family.adapter_widths_fit``), key evidence (``Family.adapter_evidence``), then metadata.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import ConfigError, ModelError
from .base import Components, Family
from .flux import FLUX_DEV, FLUX_SCHNELL
from .flux2 import FAMILY as FLUX2
from .qwen_image import FAMILY as QWEN_IMAGE
from .sd3 import SD35_LARGE, SD35_MEDIUM
from .sd1 import FAMILY as SD1
from .sd2 import FAMILY as SD2
from .sdxl import FAMILY as SDXL
from .z_image import FAMILY as Z_IMAGE

# Flux.2 before Flux.1: its original checkpoints have every block name Flux.1's detection looks for
# (double_blocks, single_blocks, guidance_in in [dev]), plus its own global modulation.
# Shared adapter-file names leave a file open to every family naming them, listed in this order; the
# first trained one among them names its keys for the toolbox (FileFamily.naming_family).
FAMILIES: tuple[Family, ...] = (SD1, SD2, SDXL, FLUX2, FLUX_DEV, FLUX_SCHNELL, SD35_LARGE, SD35_MEDIUM,
                                QWEN_IMAGE, Z_IMAGE)

__all__ = ["FAMILIES", "SD1", "SD2", "SDXL", "FLUX_DEV", "FLUX_SCHNELL", "FLUX2", "SD35_LARGE", "SD35_MEDIUM",
           "QWEN_IMAGE", "Z_IMAGE", "Components", "Family", "family_names", "get_family", "known_family",
           "family_of_models", "family_of_pipeline", "family_of_text_encoders", "prediction_type_of", "family_of_checkpoint_keys", "family_of_pipeline_class",
           "family_of_metadata", "FileFamily", "family_of_adapter", "family_of_adapter_keys"]


def markdown_table() -> str:
    """The README's family table, from the registry (`python -m lokr_diffusion.schema --write README.md`)."""
    rows = ["| family | config `family` | train | load | layout written | layouts read |", "|---|---|:-:|:-:|---|---|"]
    for f in FAMILIES:
        spellings = ", ".join(f"`{n}`" for n in (f.name, *f.aliases))
        rows.append(f"| {f.title} | {spellings} | {'yes' if f.trains else 'no'} | yes | "
                    f"{f.layout_written if f.trains else '-'} | {f.layouts_read} |")
    return "\n".join(rows)


def family_names(trainable: bool = False) -> list[str]:
    """Every spelling users may type, canonical names first (only the trained families' with
    `trainable`: what a training config may name)."""
    chosen = [f for f in FAMILIES if f.trains or not trainable]
    return [f.name for f in chosen] + [a for f in chosen for a in f.aliases]


def get_family(name: str | Family) -> Family:
    """The family a user's spelling names (``sd15``, ``SD1``, ``sd2-v``, ``xl``...)."""
    if isinstance(name, Family):
        return name
    key = str(name).strip().lower().replace("_", "-")
    for f in FAMILIES:
        if key == f.name or key in f.aliases:
            return f
    raise ConfigError(f"unknown model family {name!r}: expected one of "
                      + ", ".join(f"{f.name} ({', '.join(f.aliases)})" for f in FAMILIES))


def known_family(name: str | Family | None) -> Family | None:
    """:func:`get_family`, or None for no name or one that is no single family (e.g. ``"sd"``)."""
    try:
        return None if name is None else get_family(name)
    except ConfigError:
        return None


def family_of_models(denoiser: Any, text_encoders: Sequence[nn.Module] = (),
                     families: Sequence[Family] = FAMILIES) -> Family:
    """The family of a loaded denoiser (or its config dict) and its text encoders, among ``families``."""
    config = denoiser if isinstance(denoiser, Mapping) else getattr(denoiser, "config", None)
    if config is None:
        raise ModelError(f"cannot read a config from {type(denoiser).__name__}: expected a Diffusers denoiser")
    for f in families:
        if f.matches_models(config, text_encoders):
            return f
    raise ModelError(f"{type(denoiser).__name__} belongs to no known model family "
                     f"({', '.join(f.title for f in families)})")


def family_of_text_encoders(text_encoders: Sequence[nn.Module]) -> Family:
    """Without a denoiser, the text encoders alone: their kind (CLIP, T5), count, then width."""
    return next((f for f in FAMILIES if f.matches_text_encoders(text_encoders)), SD1)


def family_of_pipeline(pipe: Any) -> Family:
    """The family of a loaded pipeline (its denoiser and however many text encoders it has).

    Only the families that keep their denoiser under an attribute the pipeline has are asked:
    a ``unet`` is never taken for a ``transformer``.
    """
    encoders = [getattr(pipe, a) for a in dict.fromkeys(a for f in FAMILIES for a in f.text_encoder_attrs)
                if getattr(pipe, a, None) is not None]
    attrs = list(dict.fromkeys(f.denoiser_attr for f in FAMILIES))
    for attr in attrs:
        denoiser = getattr(pipe, attr, None)
        if denoiser is not None:
            return family_of_models(denoiser, encoders, [f for f in FAMILIES if f.denoiser_attr == attr])
    raise ModelError(f"{type(pipe).__name__} has no {' or '.join(attrs)}: expected a Diffusers pipeline")


def prediction_type_of(pipe: Any) -> str | None:
    scheduler = getattr(pipe, "scheduler", None)
    return scheduler.config.get("prediction_type") if scheduler is not None else None


def family_of_pipeline_class(class_name: str) -> Family | None:
    return next((f for f in FAMILIES if f.matches_pipeline_class(class_name)), None)


def family_of_checkpoint_keys(keys: Sequence[str]) -> Family | None:
    """The family of an original single-file checkpoint from its key names (the text towers differ)."""
    return next((f for f in FAMILIES if f.matches_checkpoint_keys(keys)), None)


def family_of_metadata(metadata: Mapping[str, str]) -> Family | None:
    return next((f for f in FAMILIES if f.matches_metadata(metadata)), None)


@dataclass(frozen=True)
class FileFamily:
    """What an adapter file says about its base model: one family, several that share their
    key names (an SD 1.x or 2.x file without width evidence), or nothing."""

    candidates: tuple[Family, ...]
    how: str

    @property
    def family(self) -> Family | None:
        return self.candidates[0] if len(self.candidates) == 1 else None

    @property
    def title(self) -> str:
        return " or ".join(f.title for f in self.candidates) if self.candidates else "unknown"

    @property
    def name(self) -> str | None:
        """What reports call it: the family's name, the name its candidates share (``sd``), or None."""
        if len(self.candidates) < 2:
            return self.family.name if self.family else None
        shared = {f.shared_name for f in self.candidates}
        return shared.pop() if len(shared) == 1 and "" not in shared else " or ".join(f.name for f in self.candidates)

    @property
    def naming_family(self) -> Family | None:
        """A family whose module names cover every candidate sharing its keys (the last: SD2 covers
        SD1's). When a file's names are shared by families that name their modules differently
        (``transformer_blocks.0.attn.to_q``: Flux.1, Flux.2, Qwen-Image), the names of the first one
        lokr-diffusion trains (Flux.1), as before the loading-only families existed."""
        if not self.candidates:
            return None
        first = next((f for f in self.candidates if f.trains), self.candidates[0])
        return [f for f in self.candidates if f in _sharing_names(first)][-1]

    def allows(self, family: Family) -> bool:
        return not self.candidates or family in self.candidates


def _sharing_names(family: Family) -> tuple[Family, ...]:
    """The families whose files use the same key prefixes as ``family`` (same kind of
    denoiser, same text-encoder prefixes, one shared name: SD 1.x and 2.x; Flux.1 dev and schnell)."""
    return tuple(f for f in FAMILIES if f is family or (
        family.shared_name and f.shared_name == family.shared_name
        and (f.denoiser_attr, f.text_encoder_prefixes()) == (family.denoiser_attr, family.text_encoder_prefixes())))


def _claiming(module_keys: Sequence[str]) -> tuple[Family, ...]:
    """The families whose module names (``Family.names_adapter_key``) name the most of the keys, with
    the families sharing their names. DiT families share many names (``transformer_blocks.0.attn.to_q``
    is Flux.1's, Flux.2's, SD3's and Qwen-Image's): a file naming a module only one of them has goes
    to it, a file of shared names only stays open to all of them. Only families keyed by their names at
    all (``Family.matches_adapter_keys``) count: CLIP keys alone make no Flux or SD3 file."""
    counts = {f: sum(1 for k in module_keys if f.names_adapter_key(k)) if f.matches_adapter_keys(module_keys) else 0
              for f in FAMILIES}
    best = max(counts.values(), default=0)
    if not best:
        return ()
    return tuple(dict.fromkeys(s for f in FAMILIES if counts[f] == best for s in _sharing_names(f)))


def family_of_adapter_keys(module_keys: Sequence[str], metadata: Mapping[str, str] | None = None) -> FileFamily:
    """From key prefixes and metadata only: enough for a loader to refuse a file made for
    another family's naming before it reports every key as unmatched. A file keyed by a
    family's own module names stays open to every family sharing them (a Flux.1 [dev] adapter
    loads on [schnell]), and one keyed by names several families have to all of them, unless
    the metadata names one.

    Text-encoder prefixes alone can fit several families (``lora_te1`` + ``lora_te2`` are
    SDXL's CLIP towers and SD3's): then metadata naming another family they fit decides.
    """
    metadata = metadata or {}
    claimed = _claiming(module_keys)
    if claimed:
        narrowed = _by_metadata(claimed, metadata)
        return FileFamily(narrowed, "keys (module names) and metadata" if narrowed != claimed
                          else _names_how(claimed))
    meta = family_of_metadata(metadata)
    prefixes = {k.split("_", 2)[0] + "_" + k.split("_", 2)[1] for k in module_keys if k.count("_") >= 2}
    for f in FAMILIES:
        te = f.text_encoder_prefixes()
        if len(te) > 1 and te[-1] in prefixes:
            if meta is not None and meta not in _sharing_names(f) and _fits_prefixes(meta, prefixes):
                return FileFamily(_sharing_names(meta), "metadata (the text-encoder prefixes fit it too)")
            return FileFamily(_sharing_names(f), "keys (text-encoder prefixes)")
    if meta is not None:
        return FileFamily(_sharing_names(meta), "metadata (ss_base_model_version)")
    for f in FAMILIES:
        te = f.text_encoder_prefixes()
        if len(te) == 1 and te[0] in prefixes:
            return FileFamily(_sharing_names(f), "keys (text-encoder prefix)")
    return FileFamily((), "unknown")


def _names_how(families: Sequence[Family]) -> str:
    """How a file keyed by module names was told: theirs, or which groups of families share them."""
    groups = _group_titles(families)
    return "keys (module names)" if len(groups) == 1 else f"keys (module names {' and '.join(groups)} share)"


def _group_titles(families: Sequence[Family]) -> list[str]:
    """One title per group of families sharing their names (``Flux.1``, ``SD3.5 Large or Medium``)."""
    groups = dict.fromkeys(_sharing_names(f) for f in families)
    return [g[0].shared_title or g[0].title if len(g) > 1 else g[0].title for g in groups]


def _fits_prefixes(family: Family, prefixes: set[str]) -> bool:
    """Whether every text-encoder prefix (``lora_te1``...) among ``prefixes`` is one of the family's."""
    return {p for p in prefixes if p.startswith("lora_te")} <= set(family.text_encoder_prefixes())


def _by_widths(claimed: Sequence[Family], modules: Sequence[tuple[str, str, tuple[int, ...]]]) -> tuple[Family, ...]:
    """Among families naming the same keys, those the weight shapes say are theirs (the DiT
    attention width: Flux.1 3072, SD3.5 Large 2432, Medium 1536; Flux.2's SwiGLU MLP, 6H rows
    where Flux.1's is 4H); without such a family, all but those the shapes rule out."""
    fits = {f: f.adapter_widths_fit(modules) for f in claimed}
    yes = tuple(f for f in claimed if fits[f] is True)
    return yes or tuple(f for f in claimed if fits[f] is not False) or tuple(claimed)


def _by_metadata(candidates: tuple[Family, ...], metadata: Mapping[str, str]) -> tuple[Family, ...]:
    """Among families whose names a file shares, those its metadata names (with the families sharing
    their keys: ``ss_base_model_version`` ``flux1`` leaves Flux.1 [dev] or [schnell]); all of them
    when the metadata names none."""
    named = [f for f in candidates if f.matches_metadata(metadata)]
    return tuple(dict.fromkeys(s for f in named for s in _sharing_names(f) if s in candidates)) or candidates


def _among(families: Sequence[Family], keys: Sequence[str], metadata: Mapping[str, str], how: str) -> FileFamily:
    """One of ``families`` when ``Family.adapter_evidence`` singles it out (Flux.1 [dev]'s guidance
    embedder, SD3.5 Medium's attn2), else those the metadata names, else all of them."""
    decided = [(f, why) for f in families for why in [f.adapter_evidence(keys, metadata)] if why]
    if len(decided) == 1:
        return FileFamily((decided[0][0],), decided[0][1])
    narrowed = _by_metadata(tuple(families), metadata)
    if len(narrowed) == 1:
        return FileFamily(narrowed, how + (" and metadata" if len(families) > 1 else ""))
    return FileFamily(narrowed, how + "; no key or metadata says which of " + " or ".join(f.title for f in narrowed))


def family_of_adapter(modules: Sequence[tuple[str, str, tuple[int, ...]]],
                      metadata: Mapping[str, str]) -> FileFamily:
    """From a whole adapter file: ``(component, key, flat weight shape or ())`` per module.

    The families naming the most keys decide first (see :func:`_claiming`): among them the
    weight shapes (:func:`_by_widths`), then ``Family.adapter_evidence`` and the metadata tell
    them apart, and the file stays open to all of them when nothing does. Then widths of the
    real models (DiT attention, cross-attention and text-encoder widths differ per family;
    SDXL's CLIP widths are SD3's too, so there metadata naming SD3 wins), then the metadata
    sd-scripts writes, then the key structure (text-encoder count, text-encoder depth, UNet levels).
    """
    keys = [k for _, k, _ in modules]
    claimed = _claiming(keys)
    if claimed:
        wide = _by_widths(claimed, modules)
        return _among(wide, keys, metadata, "keys (module names)" if wide == claimed else
                      "keys (module names and weight shapes)")
    wide = tuple(f for f in FAMILIES if f.adapter_widths_fit(modules))
    if wide:
        return _among(wide, keys, metadata, "keys (attention width)")
    meta = family_of_metadata(metadata)
    te_prefixes = {"lora_" + c for c, _, _ in modules if c.startswith("te")}
    for component, key, shape in modules:
        if len(shape) != 2:  # not a module of a known algorithm: no width evidence
            continue
        for f in FAMILIES:
            if (component == "unet" and key.endswith("attn2_to_k")
                    and shape[1] == getattr(f, "cross_attention_width", None)):
                return FileFamily((f,), "keys (cross-attention width)")
            if key.endswith("self_attn_q_proj") and (component, shape[0]) in getattr(f, "text_encoder_widths", ()):
                if meta is not None and meta is not f and _fits_prefixes(meta, te_prefixes):
                    return FileFamily((meta,), "metadata (the text-encoder widths fit it too)")
                return FileFamily((f,), "keys (text-encoder width)")
    if meta is not None:
        return FileFamily((meta,), "metadata (ss_base_model_version)")
    components = {c for c, _, _ in modules}
    for f in FAMILIES:
        te = [p[len("lora_"):] for p in f.text_encoder_prefixes()]
        if len(te) > 1 and components & set(te):
            return FileFamily((f,), "keys (two text encoders)")
    layers = [int(x) for _, k, _ in modules for x in re.findall(r"encoder_layers_(\d+)_", k)]
    deep = [f for f in FAMILIES if len(getattr(f, "real_text", ())) == 1
            and f.real_text[0][1]["num_hidden_layers"] > 12]
    if layers and max(layers) >= 12 and deep:
        return FileFamily(tuple(deep), "keys (more than 12 text-encoder layers)")
    unet_rests = [re.sub(r"^(lora_unet|lycoris)_", "", k) for c, k, _ in modules if c == "unet"]
    if any(r.startswith("down_blocks_3") or re.match(r"(input|output)_blocks_1[01]_", r) for r in unet_rests):
        four = tuple(f for f in FAMILIES if len(getattr(f, "real_unet", {}).get("block_out_channels", ())) == 4)
        return FileFamily(four, "keys (four UNet levels: " + " or ".join(f.title for f in four) + ")")
    return FileFamily((), "unknown")

"""What the loading-only DiT families (Flux.2, Qwen-Image, Z-Image) share: a family that
lokr-diffusion does not train, whose adapter files come keyed in the layouts ComfyUI's
``comfy/lora.py`` (``model_lora_keys_unet``) accepts for it, loaded into the family's Diffusers
transformer.

Each family module declares data, this class does the rest:

* :attr:`key_layouts`: the layouts (prefix, Diffusers or original module names, dots kept or
  turned into ``_``), as read in ComfyUI's branch for the model;
* :meth:`original_path`: the original (ComfyUI / single-file checkpoint) name of a Diffusers module
  that maps 1:1, and :meth:`fused_slices`: original layers the Diffusers model splits (Z-Image's
  ``attention.qkv``, Flux.2's ``img_attn.qkv``), as row ranges of its Diffusers modules;
* :attr:`diffusers_names` / :attr:`original_names`: regular expressions of the module names, used to
  tell a file's layout and family from its keys without a model.

Text encoders of these families are LLMs (Qwen2.5-VL, Qwen3, Mistral): their adapter keys are out of
scope, reported as unmatched with :meth:`unmatched_reason`.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import naming
from .base import Family

__all__ = ["KeyLayout", "LoadingFamily", "stacked"]


@dataclass(frozen=True)
class KeyLayout:
    """One file layout: ``prefix`` + a module name, with dots kept or turned into ``_``."""

    prefix: str
    original: bool  # names the original model's modules (else the Diffusers paths)
    flat: bool  # dots as underscores
    looks: str  # what a key looks like, for reports
    writers: str  # who writes it
    diffusers_too: bool = False  # an original-named layout that takes Diffusers paths as well (Z-Image)

    def key(self, name: str) -> str:
        return self.prefix + (name.replace(".", "_") if self.flat else name)

    def pattern(self, names: str) -> str:
        """A regex of this layout's keys for module names matched by ``names`` (dotted)."""
        body = names.replace(r"\.", "_") if self.flat else names
        return re.escape(self.prefix) + f"(?:{body})"


def stacked(denoiser: nn.Module, paths: Sequence[str]) -> list[tuple[str, int, int]]:
    """[(path, row start, row stop)] of modules whose outputs are stacked in this order in one
    fused layer of the original model; each takes as many rows as it has outputs."""
    slices, start = [], 0
    for p in paths:
        rows = denoiser.get_submodule(p).weight.shape[0]
        slices.append((p, start, start + rows))
        start += rows
    return slices


class LoadingFamily(Family):
    """A Diffusers DiT family that ``load_adapter``, ``inspect`` and ``convert`` serve, not the trainer."""

    trains = False
    layout_written = ""
    denoiser_attr = "transformer"
    text_encoder_attrs: tuple[str, ...] = ()  # LLM text encoders: no adapter keys of theirs are read
    tokenizer_attrs: tuple[str, ...] = ()
    default_prediction = "flow"
    objective = "flow"
    trigger_embeddings = False
    implementation = "diffusers"

    transformer_class: str  # the Diffusers class of the denoiser
    pipeline_classes: tuple[str, ...]
    config_keys: frozenset[str]  # denoiser config keys only this family's transformer class has
    real_transformer: dict[str, Any]  # the published model's Diffusers config (module tree and widths)
    tiny_transformer: dict[str, Any]  # overrides for a tiny model with the same module tree
    key_layouts: dict[str, KeyLayout]
    diffusers_names: str  # regex (dotted) of every Diffusers module path of the denoiser
    original_names: str = ""  # regex (dotted) of the original names files use (1:1 and fused)
    comfyui_unmapped: str = ""  # regex (dotted) of Diffusers paths ComfyUI's Diffusers-named key map lacks
    text_encoder_title: str  # for the unmatched-key message
    architecture: str  # modelspec.architecture written by convert
    base_model_version: str  # ss_base_model_version written by convert
    metadata_versions: tuple[str, ...] = ()  # ss_base_model_version spellings (lower case, [-_. ] dropped)

    # -- names: what a family module declares -----------------------------------------------------
    def original_path(self, path: str) -> str | None:
        """The original name of a Diffusers module that maps 1:1 (None: a row slice of a fused
        original layer, or no counterpart)."""
        return path

    def fused_slices(self, denoiser: nn.Module) -> dict[str, list[tuple[str, int, int]]]:
        """Original layer name -> [(Diffusers path, row start, row stop)] for layers the Diffusers
        model splits (or reorders)."""
        return {}

    # -- detection ------------------------------------------------------------------------------
    def matches_models(self, denoiser_config: Mapping[str, Any], text_encoders: Sequence[nn.Module]) -> bool:
        name = denoiser_config.get("_class_name")
        if name is not None:
            return name == self.transformer_class
        return self.config_keys <= set(denoiser_config)

    def matches_pipeline_class(self, class_name: str) -> bool:
        return class_name in self.pipeline_classes

    def _key_regex(self) -> re.Pattern:
        cached = self.__dict__.get("_key_re")
        if cached is None:
            parts = []
            for layout in self.key_layouts.values():
                if not layout.original or layout.diffusers_too:
                    parts.append(layout.pattern(self.diffusers_names))
                if layout.original and self.original_names:
                    parts.append(layout.pattern(self.original_names))
            cached = self.__dict__["_key_re"] = re.compile("|".join(f"(?:{p})" for p in parts))
        return cached

    def names_adapter_key(self, key: str) -> bool:
        return self._key_regex().fullmatch(key) is not None

    def matches_text_encoders(self, text_encoders: Sequence[nn.Module]) -> bool:
        return False

    # -- naming -----------------------------------------------------------------------------------
    def text_encoder_prefixes(self) -> list[str]:
        return []

    def denoiser_key(self, path: str, denoiser: nn.Module) -> str:
        return naming.module_key(naming.LYCORIS_PREFIX, path)

    def denoiser_key_aliases(self, path: str, denoiser: nn.Module) -> list[str]:
        keys = [self.denoiser_key(path, denoiser)]
        original = self.original_path(path)
        for layout in self.key_layouts.values():
            if not layout.original or layout.diffusers_too:
                keys.append(layout.key(path))
            if layout.original and original is not None:
                keys.append(layout.key(original))
        return list(dict.fromkeys(keys))

    def fused_groups(self, denoiser: nn.Module) -> dict[str, list[tuple[str, int, int]]]:
        groups = {}
        for original, slices in self.fused_slices(denoiser).items():
            for layout in self.key_layouts.values():
                if layout.original:
                    groups[layout.key(original)] = slices
        return groups

    def unmatched_reason(self, key: str) -> str | None:
        if key.startswith(("lora_te", "text_encoder")):
            return (f"a text-encoder key: lokr-diffusion loads {self.title} adapters into the transformer only "
                    f"(its text encoder, {self.text_encoder_title}, is not patched)")
        return None

    # -- file layouts ------------------------------------------------------------------------------
    @property
    def file_layouts(self) -> dict[str, tuple[str, str]]:  # type: ignore[override]
        return {name: (layout.looks, layout.writers) for name, layout in self.key_layouts.items()}

    def denoiser_layout(self, key: str) -> str | None:
        for name, layout in sorted(self.key_layouts.items(), key=lambda kv: -len(kv[1].prefix)):
            if layout.prefix and key.startswith(layout.prefix):
                return name if self.names_adapter_key(key) else None
        bare = [name for name, layout in self.key_layouts.items() if not layout.prefix]
        return bare[0] if bare and self.names_adapter_key(key) else None

    def layout_key(self, layout: str, path: str) -> str | None:
        try:
            spec = self.key_layouts[layout]
        except KeyError:
            raise ValueError(f"unknown {self.title} file layout {layout!r}: expected one of "
                             f"{', '.join(self.key_layouts)}") from None
        if not spec.original or spec.diffusers_too:
            return spec.key(path)
        original = self.original_path(path)
        return spec.key(original) if original is not None else None

    def ui_support(self, module_keys: Sequence[str]) -> list[tuple[str, str]]:
        """What ComfyUI does with the transformer keys (its ``model_lora_keys_unet`` branch, read as
        the family docstring says); the other UIs' loaders were not read for this family."""
        layouts = {k: self.denoiser_layout(k) for k in module_keys}
        n = sum(1 for layout in layouts.values() if layout)
        if not n:
            return []
        skipped = [k for k, layout in layouts.items() if layout and self._comfyui_skips_key(layout, k)]
        comfy = (f"skips {len(skipped)} of {n} transformer modules (its key map has no such key, e.g. {skipped[0]}); "
                 f"`lokr-diffusion convert --to kohya` writes original names it reads" if skipped else
                 f"applies all {n} transformer modules")
        return [("ComfyUI", comfy),
                ("Forge", f"not checked for {self.title}"), ("AUTOMATIC1111", f"not checked for {self.title}")]

    def _comfyui_skips_key(self, layout: str, key: str) -> bool:
        spec = self.key_layouts[layout]
        if spec.original or not self.comfyui_unmapped:
            return False
        return re.fullmatch(spec.pattern(self.comfyui_unmapped), key) is not None

    # -- metadata ----------------------------------------------------------------------------------
    def file_metadata(self, prediction_type: str | None = None) -> dict[str, str]:
        return {"ss_base_model_version": self.base_model_version, "ss_v2": "False",
                "modelspec.architecture": self.architecture, "modelspec.implementation": self.implementation}

    def matches_metadata(self, metadata: Mapping[str, str]) -> bool:
        arch = metadata.get("modelspec.architecture", "").split("/")[0]
        version = re.sub(r"[^a-z0-9]", "", metadata.get("ss_base_model_version", "").lower())
        return arch == self.architecture.split("/")[0] or (bool(version) and version in self.metadata_versions)

    def adapter_evidence(self, module_keys: Sequence[str], metadata: Mapping[str, str]) -> str | None:
        if metadata.get("modelspec.architecture", "").split("/")[0] == self.architecture.split("/")[0]:
            return "keys (module names) and metadata (modelspec.architecture)"
        return None

    # -- presets: not trained ----------------------------------------------------------------------
    def preset_filter(self, denoiser: nn.Module, preset: str) -> Callable[[str], bool]:
        raise NotImplementedError(f"{self.title} is loaded, not trained, by lokr-diffusion")

    # -- architectures -----------------------------------------------------------------------------
    def real_transformer_config(self) -> dict[str, Any]:
        return dict(self.real_transformer)

    def tiny_transformer_config(self) -> dict[str, Any]:
        return {**self.real_transformer, **self.tiny_transformer}

    def _transformer(self, config: Mapping[str, Any]) -> nn.Module:
        import diffusers

        return getattr(diffusers, self.transformer_class)(**config)

    def build_meta(self) -> tuple[nn.Module, list[nn.Module]]:
        """The real transformer without storage; no text encoder (none is patched)."""
        with torch.device("meta"):
            return self._transformer(self.real_transformer_config()), []

    def build_tiny(self, out_dir: str | Path, seed: int = 0) -> Path:
        """A tiny random transformer with the real module names, saved under ``<out_dir>/transformer``
        (no whole pipeline: the text encoders are multi-billion-parameter LLMs)."""
        out = Path(out_dir)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self._transformer(self.tiny_transformer_config())
        model.save_pretrained(str(out / "transformer"), safe_serialization=True)
        return out

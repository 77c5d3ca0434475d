"""What a model family declares: the one place the rest of the package asks about a family.

A family is a set of base models that share module names, file-key rules, conditioning and
objective (SD 1.x, SD 2.x, SDXL; DiTs later). The trainer, the loader, the toolbox and the toy
code hold a :class:`Family` object and ask it; none of them compares family names. Adding a
family is one module that subclasses :class:`Family` and registers an instance in
``families/__init__.py``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass
class Components:
    """The parts of a loaded pipeline that training and loading touch, in a fixed order.

    ``text_encoders[i]`` pairs with ``tokenizers[i]`` and with the i-th text-encoder file
    prefix; the order is the family's, not the pipeline attribute dictionary's.
    """

    denoiser: nn.Module
    text_encoders: list[nn.Module]
    tokenizers: list[Any]
    vae: nn.Module | None


class Family:
    """Base class: every attribute and method here is something another module asks about."""

    name: str  # canonical name, used in configs, the CLI and reports
    title: str  # for people: "SD 1.x"
    aliases: tuple[str, ...] = ()  # other spellings accepted from users
    pipeline_class: str  # the Diffusers pipeline class that loads it
    text_encoder_attrs: tuple[str, ...] = ("text_encoder",)
    tokenizer_attrs: tuple[str, ...] = ("tokenizer",)
    denoiser_attr: str = "unet"
    default_prediction: str = "epsilon"

    # -- the parts of a pipeline ---------------------------------------------------------------
    def components(self, pipe: Any) -> Components:
        return Components(
            denoiser=getattr(pipe, self.denoiser_attr),
            text_encoders=[getattr(pipe, a) for a in self.text_encoder_attrs if getattr(pipe, a, None) is not None],
            tokenizers=[getattr(pipe, a) for a in self.tokenizer_attrs if getattr(pipe, a, None) is not None],
            vae=getattr(pipe, "vae", None),
        )

    # -- detection: each answers True only when the evidence is this family's --------------------
    def matches_models(self, denoiser_config: Mapping[str, Any], text_encoders: Sequence[nn.Module]) -> bool:
        raise NotImplementedError

    def matches_pipeline_class(self, class_name: str) -> bool:
        return class_name == self.pipeline_class

    def matches_checkpoint_keys(self, keys: Sequence[str]) -> bool:
        raise NotImplementedError

    # -- naming ---------------------------------------------------------------------------------
    def text_encoder_prefixes(self) -> list[str]:
        """File-key prefix of each text encoder, in order."""
        raise NotImplementedError

    def denoiser_key(self, path: str, denoiser: nn.Module) -> str:
        """The key this project writes for a denoiser module (the layout other tools read)."""
        raise NotImplementedError

    def denoiser_key_aliases(self, path: str, denoiser: nn.Module) -> list[str]:
        """Every key files in the wild use for a denoiser module."""
        raise NotImplementedError

    # -- presets --------------------------------------------------------------------------------
    def preset_filter(self, denoiser: nn.Module, preset: str) -> Callable[[str], bool]:
        """``module path -> whether the preset trains it``, prepared once per denoiser."""
        raise NotImplementedError

    # -- conditioning and objective --------------------------------------------------------------
    def encode_text(self, text_encoders: Sequence[nn.Module], input_ids: Sequence[torch.Tensor],
                    device: torch.device) -> dict[str, torch.Tensor]:
        """Prompt embeddings the way the family's Diffusers pipeline makes them."""
        raise NotImplementedError

    def denoise(self, denoiser: nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor,
                embeds: Mapping[str, torch.Tensor], batch: Mapping[str, Any]) -> torch.Tensor:
        """One denoiser forward with the family's extra conditioning taken from the batch."""
        raise NotImplementedError

    # -- file metadata ----------------------------------------------------------------------------
    def variant(self, prediction_type: str | None) -> str:
        """The name of the base model as files record it (e.g. SD2 with v-prediction is ``sd2-v``)."""
        return self.name

    def file_metadata(self, prediction_type: str | None = None) -> dict[str, str]:
        """The ``ss_*`` / ``modelspec.*`` keys that say which base model a file is for."""
        raise NotImplementedError

    def matches_metadata(self, metadata: Mapping[str, str]) -> bool:
        raise NotImplementedError

    # -- what the toolbox reads from, and warns about in, this family's adapter files -------------
    # (file component, hidden width) per text encoder: tells a PEFT text-encoder folder's component
    text_encoder_widths: tuple[tuple[str, int], ...] = ()
    needs_base_model_version = False  # A1111 hides a file with metadata but no ss_base_model_version
    shared_name = ""  # what reports call it with the families sharing its file keys ("sd"), if any
    shared_title = ""  # the same for people ("SD 1.x or 2.x")

    def misread_denoiser_key(self, key: str) -> tuple[str, str] | None:
        """(warning code, message) when some UI applies this denoiser file key to the wrong layer;
        None when every tool reads it as meant."""
        return None

    # -- architectures ----------------------------------------------------------------------------
    def build_meta(self) -> tuple[nn.Module, list[nn.Module]]:
        """The real denoiser and text encoders without storage, for names and counts."""
        raise NotImplementedError

    def build_tiny(self, out_dir: str | Path, seed: int = 0) -> Path:
        """Write a small random Diffusers pipeline with the real module names."""
        raise NotImplementedError

    def to_original(self, pipe: Any) -> dict[str, torch.Tensor]:
        """All weights of a pipeline under the original single-file checkpoint keys."""
        raise NotImplementedError(f"cannot write a single-file checkpoint for {self.title}")

    def __repr__(self) -> str:
        return f"<family {self.name}>"

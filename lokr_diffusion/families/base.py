"""What a model family declares: the one place the rest of the package asks about a family.

A family is a set of base models that share module names, file-key rules, conditioning and
objective (SD 1.x, SD 2.x, SDXL; DiTs later). The trainer, the loader, the toolbox and the toy
code hold a :class:`Family` object and ask it; none of them compares family names. Adding a
family is one module that subclasses :class:`Family` and registers an instance in
``families/__init__.py``.
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
from ..errors import ConfigError

# A DiT attention projection in any layout (``..attn_to_q``, ``..attn.to_q``, fused ``..attn_qkv``):
# its in-features are the hidden width (see Family.attention_width)
_ATTENTION_KEY = re.compile(r"attn[._](to_q|qkv)$")

# CLIP text-encoder layers per preset (LyCORIS: CLIPAttention, and CLIPMLP outside attn-only).
CLIP_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
CLIP_MLP = ("mlp.fc1", "mlp.fc2")


def clip_preset_filter(preset: str) -> Callable[[str], bool]:
    """``path -> bool`` for a CLIP text encoder: attention projections, plus the MLP outside attn-only.

    ``full`` adds nothing over ``attn-mlp``: a CLIP text tower has no other Linear layers.
    """
    def chosen(path: str) -> bool:
        return path.endswith(CLIP_ATTN) or (preset != "attn-only" and path.endswith(CLIP_MLP))

    return chosen


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
    objective: str = "noise"  # "noise" (DDPM epsilon / v) or "flow" (rectified flow)
    trains = True  # the trainer trains it (False: load_adapter and the toolbox only)
    layout_written = ""  # the file layout the trainer writes (README family table)
    layouts_read = ""  # the layouts load_adapter reads (README family table)
    trigger_embeddings = True  # pivotal tuning of new CLIP tokens (every text encoder is a CLIP tower)
    text_cache_on_disk = False  # cache prompt embeddings on disk rather than in memory (T5: 8 MB a caption)
    # why `[train] clip_skip` > 1 is refused for this family; None where encode_text takes clip_skip
    clip_skip_refusal: str | None = ("its pipeline fixes which text-encoder layers make the prompt embedding "
                                     "(clip_skip chooses the CLIP layer of SD 1.x / 2.x)")

    @property
    def default_trained_text_encoders(self) -> tuple[int, ...]:
        """Indices of the text encoders a run trains when it trains "the text encoder" without
        saying which: all of them by default; a family overrides this (Flux: CLIP-L only, since
        T5-XXL is 4.8 B parameters and the trainers in the wild leave it frozen)."""
        return tuple(range(len(self.text_encoder_attrs)))

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

    def matches_text_encoders(self, text_encoders: Sequence[nn.Module]) -> bool:
        """Whether text encoders alone (no denoiser) look like this family's."""
        return False

    def names_adapter_key(self, key: str) -> bool:
        """Whether one adapter-file module key names a module of this family in a layout it reads,
        its own name or one other families share (Flux.1's double blocks are SD3's joint blocks and
        Flux.2's and Qwen-Image's blocks by name), text-encoder keys included. The registry counts
        these: the families naming the most keys of a file are the ones it may be for."""
        return False

    def matches_adapter_keys(self, module_keys: Sequence[str]) -> bool:
        """Whether a file is keyed by this family's names at all, so that its :meth:`names_adapter_key`
        count is asked. Default: any key it names. A family naming keys that families outside the
        count have too (CLIP ``lora_te1_`` keys: SD's) needs one of its other names as well."""
        return any(self.names_adapter_key(k) for k in module_keys)

    def adapter_widths_fit(self, modules: Sequence[tuple[str, str, tuple[int, ...]]]) -> bool | None:
        """For a file whose keys other families name too: whether its weight shapes ``(component,
        key, (out, in))`` are this family's (True), another's (False), or say nothing (None).
        Default: True when an attention projection's in-features are :attr:`attention_width`;
        another width says nothing (a variant or a tiny test model may have it)."""
        if self.attention_width is None:
            return None
        widths = {shape[1] for _, key, shape in modules if len(shape) == 2 and _ATTENTION_KEY.search(key)}
        return True if self.attention_width in widths else None

    def unmatched_reason(self, key: str) -> str | None:
        """Why a file key matches no module of this family's models, when the family knows (e.g. a
        text encoder it does not load); None otherwise."""
        return None

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

    def text_encoder_key(self, index: int, path: str) -> str:
        """The key this project writes for module ``path`` of text encoder ``index`` (family order).

        Default: sd-scripts' CLIP naming, ``<prefix>_text_model_<path>`` whatever level
        transformers puts ``text_model`` at.
        """
        return naming.text_encoder_key(self.text_encoder_prefixes()[index], path)

    def text_encoder_key_aliases(self, index: int, path: str) -> list[str]:
        """Every key files in the wild use for that text-encoder module (CLIP default: with and
        without ``text_model_``; a lone encoder also as ``lora_te1_``)."""
        return naming.text_encoder_key_aliases(index, len(self.text_encoder_prefixes()), path)

    def fused_groups(self, denoiser: nn.Module) -> dict[str, list[tuple[str, int, int]]]:
        """File keys that name one fused layer of the original model which the Diffusers model
        splits (Flux's ``img_attn.qkv``) -> ``[(denoiser module path, row start, row stop), ...]``:
        each module gets those rows of the fused update. None for families without fused layers."""
        return {}

    # -- presets --------------------------------------------------------------------------------
    def preset_filter(self, denoiser: nn.Module, preset: str) -> Callable[[str], bool]:
        """``module path -> whether the preset trains it``, prepared once per denoiser."""
        raise NotImplementedError

    def text_preset_filter(self, index: int, model: nn.Module, preset: str) -> Callable[[str], bool]:
        """The same for text encoder ``index``; every text encoder is a CLIP tower by default."""
        return clip_preset_filter(preset)

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
    # in-features of a DiT's attention projections (its hidden width H): tells apart DiT files
    # keyed by names several families share (Flux.1 3072, SD3.5 Large 2432, Medium 1536); None for UNets
    attention_width: int | None = None
    needs_base_model_version = False  # A1111 hides a file with metadata but no ss_base_model_version
    shared_name = ""  # what reports call it with the families sharing its file keys ("sd"), if any
    shared_title = ""  # the same for people ("SD 1.x or 2.x")

    def misread_denoiser_key(self, key: str) -> tuple[str, str] | None:
        """(warning code, message) when some UI applies this denoiser file key to the wrong layer;
        None when every tool reads it as meant."""
        return None

    def adapter_evidence(self, module_keys: Sequence[str], metadata: Mapping[str, str]) -> str | None:
        """For a file keyed by names this family shares with others (Flux.1 dev and schnell): why
        it is this family's (a module only it has, metadata naming it exactly), or None."""
        return None

    # -- file layouts: DiT families whose files come keyed in several ways ---------------------------
    file_layouts: Mapping[str, tuple[str, str]] = {}  # layout name -> (what its keys look like, who writes it)

    def denoiser_layout(self, key: str) -> str | None:
        """Which of :attr:`file_layouts` a denoiser module key is in; None for other keys."""
        return None

    def layout_key(self, layout: str, path: str) -> str | None:
        """The key of denoiser module ``path`` in ``layout``; None when the layout names it only as a
        row slice of a fused module (see :meth:`fused_groups`)."""
        raise NotImplementedError(f"{self.title} has no file layouts to choose from")

    def require_layout(self, layout: str) -> None:
        """Refuse a layout name another family has but this one does not (SD3's ``base_model``
        asked of a Flux file) with the choices, before a key function meets it."""
        if layout not in self.file_layouts:
            raise ConfigError(f"{self.title} files have no {layout!r} key layout: expected one of "
                              f"{', '.join(self.file_layouts) or 'none'}")

    def layout_metadata(self, layout: str) -> dict[str, str]:
        """Metadata that must change with the layout (whose module names the file uses)."""
        return {}

    def ui_support(self, module_keys: Sequence[str]) -> list[tuple[str, str]]:
        """(UI, what it does with these denoiser keys) for the UIs whose loaders were read for
        this family; [] when the format spec's SD tables say it all."""
        return []

    # -- training memory ------------------------------------------------------------------------
    def activation_allowance(self, denoiser: nn.Module, resolution: tuple[int, int], batch_size: int,
                             dtype_bytes: int, checkpointing: bool) -> tuple[int, str] | None:
        """(bytes, how they were estimated) of the denoiser's activations in one training step, or
        None when the family has no estimate."""
        return None

    @property
    def can_write_single_file(self) -> bool:
        """Whether :meth:`to_original` is implemented (merge into one checkpoint file)."""
        return type(self).to_original is not Family.to_original

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

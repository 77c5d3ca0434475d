"""Base models: turning what a user typed (hub id, Diffusers folder, single file) into a pipeline.

Which family a model is, and everything that depends on it, lives in ``lokr_diffusion.families``;
this module only loads, and turns every failure into a :class:`ModelError` naming the path.
"""
from __future__ import annotations

import contextlib
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from .dtypes import parse_dtype
from .errors import ConfigError, ModelError
from .families import FAMILIES, Family, family_of_checkpoint_keys, family_of_pipeline, family_of_pipeline_class, get_family

__all__ = ["load_pipeline"]


# --------------------------------------------------------------------------------------
# Loading what the user names
# --------------------------------------------------------------------------------------

_SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@contextlib.contextmanager
def _quiet_dtype_deprecation():
    """Recent diffusers renamed ``torch_dtype`` to ``dtype`` (with a warning); older ones only know the former."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        yield


def _single_file_family(path: str) -> Family:
    """Family of an original (ldm/sgm) checkpoint from its key names."""
    if path.lower().endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
    else:
        from diffusers.loaders.single_file_utils import load_single_file_checkpoint

        keys = list(load_single_file_checkpoint(path).keys())
    family = family_of_checkpoint_keys(keys)
    if family is None:
        raise ModelError(
            f"cannot tell the model family of {path}: its keys match none of "
            f"{', '.join(f.title for f in FAMILIES)} (SD: cond_stage_model.* or conditioner.embedders.*; "
            "Flux: double_blocks.*; SD3: joint_blocks.*); pass family= explicitly")
    return family


def _pipeline_class(family: Family):
    import diffusers

    return getattr(diffusers, family.pipeline_class)


def _pipeline_kwargs(family: Family, **options: Any) -> dict[str, Any]:
    """from_pretrained / from_single_file options; the SD1/2 safety checker is never loaded."""
    kwargs: dict[str, Any] = {}
    if family.pipeline_class == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    kwargs.update({k: v for k, v in options.items() if v is not None})
    return kwargs


def load_pipeline(
    pretrained: str | os.PathLike,
    family: str | Family = "auto",
    revision: str | None = None,
    variant: str | None = None,
    torch_dtype: torch.dtype | str | None = None,
    prediction_type: str = "auto",
):
    """Load a base model from a hub id, a Diffusers folder or a single ``.safetensors``/``.ckpt``.

    Every failure becomes a :class:`ModelError` naming the path and what was expected, so
    the CLI can print one line instead of a traceback from deep inside diffusers.
    ``family`` (``"auto"`` or any spelling :func:`~lokr_diffusion.families.get_family` takes)
    picks the pipeline class and is checked against the loaded model; ``prediction_type``
    other than ``"auto"`` overrides the scheduler's (e.g. v-prediction SD2 checkpoints whose
    files cannot say so).
    """
    requested = None if family == "auto" else get_family(family)
    if prediction_type != "auto" and prediction_type not in _PREDICTION_TYPES:
        raise ConfigError(f"unknown prediction_type {prediction_type!r}: expected auto or one of {_PREDICTION_TYPES}")
    dtype = parse_dtype(torch_dtype) if torch_dtype is not None else None
    name = os.fspath(pretrained)
    path = Path(name).expanduser()
    is_url = name.startswith(("http://", "https://"))

    if is_url or name.lower().endswith(_SINGLE_FILE_SUFFIXES):
        if not is_url and not path.is_file():
            raise ModelError(f"model file {name} does not exist (expected a .safetensors/.ckpt checkpoint)")
        pipe = _load_single_file(name if is_url else str(path), requested, dtype, revision)
    elif path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(
                f"{name} is not a Diffusers pipeline folder: expected a model_index.json in it "
                "(for a single checkpoint file pass the .safetensors/.ckpt path)")
        pipe = _load_diffusers(str(path), requested, dtype, revision, variant)
    elif path.exists():
        raise ModelError(f"{name} is neither a folder nor a .safetensors/.ckpt file")
    elif _HUB_ID.match(name) and not name.startswith((".", "~")):
        pipe = _load_diffusers(name, requested, dtype, revision, variant)
    else:
        raise ModelError(f"model path {name} does not exist (expected a Diffusers folder, a "
                         ".safetensors/.ckpt file or a Hugging Face hub id like owner/name)")

    if prediction_type != "auto" and pipe.scheduler.config.get("prediction_type") != prediction_type:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction_type)
    found = family_of_pipeline(pipe)
    if requested is not None and found is not requested:
        raise ModelError(f"{name} is an {found.title} model, but family {requested.name} was requested")
    return pipe


def _load_single_file(name: str, family: Family | None, dtype: torch.dtype | None, revision: str | None):
    if family is None:
        if name.startswith(("http://", "https://")):
            raise ModelError(f"cannot detect the family of remote file {name}; pass family= one of "
                             f"{', '.join(f.name for f in FAMILIES)}")
        try:
            family = _single_file_family(name)
        except ModelError:
            raise
        except Exception as exc:  # unreadable header, truncated pickle, ...
            raise ModelError(f"cannot read checkpoint {name}: {exc}") from exc
    cls = _pipeline_class(family)
    try:
        with _quiet_dtype_deprecation():
            return cls.from_single_file(name, **_pipeline_kwargs(family, revision=revision, torch_dtype=dtype))
    except Exception as exc:
        raise ModelError(f"could not load {name} as a single-file {family.name} checkpoint with "
                         f"{cls.__name__}.from_single_file (it needs the family's Diffusers configs "
                         f"from the hub or its cache): {exc}") from exc


def _load_diffusers(name: str, family: Family | None, dtype: torch.dtype | None, revision: str | None,
                    variant: str | None):
    from diffusers import DiffusionPipeline

    where = "folder" if os.path.isdir(name) else "hub repository"
    try:
        index = DiffusionPipeline.load_config(name, revision=revision)
    except Exception as exc:
        raise ModelError(f"could not read model_index.json of {where} {name}: {exc}") from exc
    class_name = str(index.get("_class_name", ""))
    by_class = family_of_pipeline_class(class_name)
    if family is None:
        if by_class is None:
            raise ModelError(f"{where} {name} holds a {class_name or 'unknown'} pipeline: expected a "
                             "Stable Diffusion 1.x/2.x/XL pipeline")
        family = by_class
    elif by_class is not None and by_class.pipeline_class != family.pipeline_class:
        raise ModelError(f"{where} {name} holds a {class_name}, but family {family.name} was requested")
    cls = _pipeline_class(family)
    try:
        with _quiet_dtype_deprecation():
            return cls.from_pretrained(name, **_pipeline_kwargs(family, revision=revision, variant=variant,
                                                                torch_dtype=dtype))
    except Exception as exc:
        raise ModelError(f"could not load {where} {name} with {cls.__name__}.from_pretrained: {exc}") from exc

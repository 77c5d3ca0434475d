"""`merge`: bake adapters into a base model and write it as a Diffusers folder or one checkpoint.

The adapters are applied by the same code as `load_adapter` (a network per file, merged in
float32 into float32 weights), so a merged model matches the base with the adapters loaded.
The dtype cast happens once, at the end.
"""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

import torch

from ..errors import AdapterFileError, ConfigError
from ..families import Family, family_of_pipeline, family_of_pipeline_class, prediction_type_of
from ..fileformat import write_safetensors
from ..loading import finite_scale, network_from_tensors
from ..models import load_pipeline
from ..pipelines import _components as pipeline_components
from .inspection import read_adapter
from .outputs import atomic_folder, check_output



def parse_adapter_arg(value: str) -> tuple[str, float]:
    """FILE[:SCALE]; a colon followed by something that is not a number stays part of the path."""
    path, sep, tail = value.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return value, 1.0


@torch.no_grad()
def merge_adapters(base: str, adapters: list[tuple[str, float]], out: str | Path, dtype: torch.dtype | None = None,
                   overwrite: bool = False) -> dict[str, Any]:
    """Merge each (file, scale) into `base`; OUT ending in .safetensors is a single-file checkpoint."""
    if not adapters:
        raise ConfigError("merge: give at least one --adapter FILE[:SCALE]")
    out = check_output(out, overwrite)
    files = []
    for path, scale in adapters:  # a bad adapter fails before minutes of model loading
        finite_scale(f"the scale of adapter {path}", scale)
        modules, metadata, _, _, _ = read_adapter(path)  # checked: shapes, dtypes, NaN/inf
        tensors = {f"{k}.{n}": t for k, m in modules.items()
                   for n, t in {**m.tensors, **m.extras, **({"alpha": m.alpha} if m.alpha is not None else {})}.items()}
        files.append((path, scale, tensors, metadata))
    _refuse_single_file(out, _family_of_folder(base))  # before minutes of model loading
    pipe = load_pipeline(base, torch_dtype=torch.float32)
    family = family_of_pipeline(pipe)
    _refuse_single_file(out, family)
    prediction = prediction_type_of(pipe)
    unet, encoders = pipeline_components(pipe)
    reports = []
    for path, scale, tensors, metadata in files:
        network, report = network_from_tensors(tensors, unet, encoders, metadata=metadata, source=str(path),
                                               multiplier=scale)
        network.merge()
        for adapter in network.adapters():
            adapter.detach()  # the weights now hold the update; the hooks must not add it again
            if not torch.isfinite(adapter.base.weight).all():
                raise AdapterFileError(f"{path}: merging at scale {scale:g} makes module {adapter.key} non-finite "
                                       "(NaN or inf: the update overflows float32); nothing was written")
        reports.append({"file": str(path), "scale": scale, "modules": dict(report.patched),
                        "unmatched": len(report.unmatched)})
    if out.suffix == ".safetensors":
        tensors = family.to_original(pipe)
        if dtype is not None:
            tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
        write_safetensors(out, tensors, _checkpoint_metadata(family, prediction, out, reports))
        layout = "single-file (original keys)"
    else:
        if dtype is not None:
            parts = family.components(pipe)
            for module in (parts.denoiser, parts.vae, *parts.text_encoders):
                if module is not None:  # plain cast: ModelMixin.to warns about fp32 modules SD does not have
                    torch.nn.Module.to(module, dtype=dtype)
        with atomic_folder(out, overwrite) as tmp:
            pipe.save_pretrained(str(tmp), safe_serialization=True)
        layout = "diffusers folder"
    return {"base": str(base), "family": family.variant(prediction), "output": str(out), "layout": layout,
            "dtype": str(dtype or torch.float32).replace("torch.", ""), "adapters": reports}


def _family_of_folder(base: str) -> Family | None:
    """The family a Diffusers folder's model_index.json names, without loading anything."""
    index = Path(base).expanduser() / "model_index.json"
    try:
        return family_of_pipeline_class(json.loads(index.read_text()).get("_class_name", ""))
    except (OSError, ValueError, AttributeError):
        return None


def _refuse_single_file(out: Path, family: Family | None) -> None:
    """A single-file OUT needs the family's original checkpoint layout (``Family.to_original``)."""
    if family is not None and out.suffix == ".safetensors" and not family.can_write_single_file:
        raise ConfigError(f"{out}: merge cannot write {family.title} as one original-layout checkpoint file yet; "
                          f"give a folder as OUT for a Diffusers pipeline (e.g. {out.with_suffix('')})")


def _checkpoint_metadata(family: Family, prediction: str | None, out: Path, reports: list[dict]) -> dict[str, str]:
    return {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": family.checkpoint_metadata_architecture(prediction),
        "modelspec.implementation": family.implementation,
        "modelspec.title": out.stem,
        "modelspec.date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
        "lokr_diffusion_merged_adapters": json.dumps([{"file": Path(r["file"]).name, "scale": r["scale"]}
                                                      for r in reports]),
    }


def format_merge(r: dict[str, Any]) -> str:
    lines = [f"merged into {r['base']} ({r['family']}) -> {r['output']} [{r['layout']}, {r['dtype']}]"]
    for a in r["adapters"]:
        unmatched = f"; {a['unmatched']} modules matched nothing" if a["unmatched"] else ""
        lines.append(f"  {a['file']} x {a['scale']:g}: " + ", ".join(f"{c} {n}" for c, n in a["modules"].items())
                     + unmatched)
    return "\n".join(lines)

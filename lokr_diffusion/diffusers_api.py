"""Diffusers' adapter methods (`pipe.set_adapters`, `pipe.fuse_lora`...) for the adapters this
project loads.

Diffusers drives adapters through PEFT tuner layers, which cannot hold every LyCORIS file
exactly (LoKr with both factors full is applied at scale 1, PEFT applies alpha / r; a Flux file
patching the original fused qkv layer has no PEFT form; one file may mix LoKr and LoRA modules).
So instead of registering PEFT tuners, :func:`use_diffusers_api` puts methods with Diffusers'
names and arguments on one pipeline object; they route to `lokr_diffusion.pipelines`, the same
state `load_adapter` & co. keep, so every family and every file applies as the loader applies it.
`load_adapter` on a pipeline installs them itself.

Where Diffusers 0.42 is ambiguous or silently does something else, these methods say so:
an unknown adapter or component name is an error naming the known ones (Diffusers ignores an
unknown name in `delete_adapters`), changing weights or loading while something is fused is an
error (Diffusers changes the scale of a fused PEFT layer, so a later unfuse subtracts the wrong
amount), and `unfuse_lora` restores the saved weights bit for bit and leaves each adapter at the
weight `set_adapters` gave it (after Diffusers' unfuse the `lora_scale` of `fuse_lora` stays
multiplied into PEFT's scaling). As in Diffusers, `unload_lora_weights` after `fuse_lora` keeps
the fused weights (fuse, unload, save: a merged model) and a loaded adapter becomes the only
active one.
"""
from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from types import MethodType
from typing import Any, Mapping, Sequence

import torch

from .loading import LoadReport, finite_scale
from .pipelines import (_apply_enabled, _apply_scales, _components, _fuse, _remove, _State, _state, _sync_fused,
                        _unfuse, load_adapter)

logger = logging.getLogger(__name__)

METHODS = ("load_lora_weights", "set_adapters", "get_active_adapters", "get_list_adapters", "fuse_lora",
           "unfuse_lora", "unload_lora_weights", "delete_adapters", "disable_lora", "enable_lora", "set_lora_device")
_HUB_ARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")
_INSTALLED = "_lokr_diffusion_diffusers_api"


# -- components: Diffusers names them by pipeline attribute, the loader by file prefix --------------

def _component_names(pipe: Any) -> dict[str, str]:
    """Pipeline attribute (``unet``, ``transformer``, ``text_encoder_2``...) -> the loader's
    component (``unet``, ``te``, ``te1``...), for the parts the pipeline has, paired in the
    order the loader pairs text encoders with the family's file prefixes."""
    from .families import family_of_pipeline

    family = family_of_pipeline(pipe)
    names = {family.denoiser_attr: "unet"}
    present = [a for a in family.text_encoder_attrs if getattr(pipe, a, None) is not None]
    for attr, prefix in zip(present, family.text_encoder_prefixes()):
        names[attr] = prefix[len("lora_"):]
    return names


def _default_components(pipe: Any, method: str) -> list[str]:
    """The components Diffusers' own `fuse_lora` / `unfuse_lora` of this pipeline class default
    to (SD: unet + text_encoder; Flux fuses only the transformer), else every component."""
    own = getattr(type(pipe), method, None)
    default = inspect.signature(own).parameters.get("components") if own is not None else None
    if default is not None and isinstance(default.default, (list, tuple)):
        return [c for c in default.default if getattr(pipe, c, None) is not None]
    return list(_component_names(pipe))


def _our_components(pipe: Any, components: Sequence[str] | None, method: str) -> set[str]:
    names = _component_names(pipe)
    chosen = _default_components(pipe, method) if components is None else _names(components)
    if not chosen:
        raise ValueError(f"{method}: `components` cannot be an empty list; this pipeline has {list(names)}")
    unknown = [c for c in chosen if c not in names]
    if unknown:
        raise ValueError(f"{method}: {', '.join(map(repr, unknown))} is no adapter component of "
                         f"{type(pipe).__name__}; expected some of {list(names)}")
    return {names[c] for c in chosen}


def _known(state: _State, names: Sequence[str], method: str) -> None:
    unknown = [n for n in names if n not in state.adapters]
    if unknown:
        raise ValueError(f"{method}: no adapter named {', '.join(map(repr, unknown))}; loaded: "
                         f"{', '.join(map(repr, state.adapters)) or 'none'}")


def _not_fused(state: _State, method: str) -> None:
    fused = state.fused()
    if fused:
        raise RuntimeError(f"{method}: adapter(s) {', '.join(map(repr, fused))} are fused into the weights; "
                           "call pipe.unfuse_lora() first")


def _names(adapter_names: str | Sequence[str]) -> list[str]:
    return [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)


# -- the methods ---------------------------------------------------------------------------------

def load_lora_weights(pipe: Any, pretrained_model_name_or_path_or_dict: str | os.PathLike | Mapping[str, torch.Tensor],
                      adapter_name: str | None = None, hotswap: bool = False, **kwargs: Any) -> LoadReport:
    """Load a LoKr / LoHa / LoRA file, folder or state dict under `adapter_name` (default
    ``default_<n>``, as Diffusers names them) and make it the only active adapter.

    Takes a file, a folder plus ``weight_name`` (and ``subfolder``), a PEFT folder, a state dict,
    or a Hub repository id plus ``weight_name`` (fetched with huggingface_hub and the Hub
    arguments Diffusers takes). Returns the load report.
    """
    weight_name, subfolder = kwargs.pop("weight_name", None), kwargs.pop("subfolder", None)
    kwargs.pop("low_cpu_mem_usage", None)  # nothing to save: the file's tensors are the adapter
    hub = {k: kwargs.pop(k) for k in _HUB_ARGS if k in kwargs}
    if kwargs:
        raise TypeError(f"load_lora_weights: unsupported argument(s) {sorted(kwargs)} for lokr-diffusion adapters")
    if hotswap:
        raise ValueError("load_lora_weights: hotswap is not supported for lokr-diffusion adapters; "
                         "delete_adapters(name) and load the new file instead")
    state = _state(pipe)
    _not_fused(state, "load_lora_weights")
    source: Any = pretrained_model_name_or_path_or_dict
    if not isinstance(source, Mapping):
        source = _resolve(Path(source), weight_name, subfolder, hub)
    if adapter_name is None:
        n = len(state.adapters)
        while f"default_{n}" in state.adapters:
            n += 1
        adapter_name = f"default_{n}"
    report = load_adapter(pipe, source, adapter_name=adapter_name)
    state.active = [adapter_name]
    _apply_enabled(state)
    return report


def _resolve(path: Path, weight_name: str | None, subfolder: str | None, hub: dict[str, Any]) -> Path:
    """The local file (or PEFT folder) to load: Diffusers' path, folder and Hub forms."""
    local = path / subfolder if subfolder else path
    if local.is_dir():
        if weight_name is not None:
            return local / weight_name
        if (local / "adapter_config.json").exists():
            return local
        files = sorted(local.glob("*.safetensors"))
        if len(files) == 1:
            return files[0]
        raise FileNotFoundError(f"{local}: give weight_name= (the folder holds "
                                f"{len(files) or 'no'} .safetensors files{': ' + ', '.join(f.name for f in files) if files else ''})")
    if local.exists() or weight_name is None:
        if not local.exists():
            raise FileNotFoundError(f"{local}: no such adapter file or folder (a Hub repository id also needs "
                                    "weight_name=)")
        return local
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(str(path), weight_name, subfolder=subfolder, **hub))


def set_adapters(pipe: Any, adapter_names: str | Sequence[str],
                 adapter_weights: float | dict | Sequence[float | dict | None] | None = None) -> None:
    """Make exactly `adapter_names` active, each at its weight (1.0 when None).

    A weight is a number or a dict per pipeline component (``{"unet": 0.8, "text_encoder":
    0.5}``; a component left out gets 1.0), as in Diffusers; Diffusers' per-block UNet dicts
    are refused, since one number per component is all these adapters take.
    """
    state = _state(pipe)
    names = _names(adapter_names)
    weights = list(adapter_weights) if isinstance(adapter_weights, (list, tuple)) else [adapter_weights] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"set_adapters: {len(names)} adapter name(s) but {len(weights)} weight(s)")
    _known(state, names, "set_adapters")
    if len(set(names)) != len(names):
        raise ValueError(f"set_adapters: an adapter is named twice in {names}")
    _not_fused(state, "set_adapters")
    components = _component_names(pipe)
    settings = [(name, _weight(name, w, components)) for name, w in zip(names, weights)]
    for name, (scale, per_component) in settings:
        adapter = state.adapters[name]
        adapter.scale, adapter.unet_scale, adapter.text_encoder_scale = scale, None, None
        adapter.component_scales = per_component
        _apply_scales(adapter)
    state.active = names
    _apply_enabled(state)


def _weight(name: str, weight: Any, components: dict[str, str]) -> tuple[float, dict[str, float]]:
    """(scale, per-component scales) of one adapter's set_adapters weight."""
    if weight is None:
        return 1.0, {}
    if not isinstance(weight, Mapping):
        return finite_scale(f"set_adapters: weight of {name!r}", weight), {}
    unknown = [c for c in weight if c not in components]
    if unknown:
        raise ValueError(f"set_adapters: weight of {name!r} names {', '.join(map(repr, unknown))}, no adapter "
                         f"component of this pipeline; expected some of {list(components)}")
    per = {}
    for attr, value in weight.items():
        if isinstance(value, Mapping):
            raise ValueError(f"set_adapters: weight of {name!r} for {attr!r} is a dict (per-block weights); "
                             "lokr-diffusion adapters take one number per component")
        per[components[attr]] = 1.0 if value is None else finite_scale(f"set_adapters: {name!r} {attr}", value)
    return 1.0, per


def get_active_adapters(pipe: Any) -> list[str]:
    """The adapters that compute (disable_lora does not change this list, as in Diffusers)."""
    return list(_state(pipe).active)


def get_list_adapters(pipe: Any) -> dict[str, list[str]]:
    """Pipeline component -> the adapters that patch some layer of it, in load order."""
    state = _state(pipe)
    out: dict[str, list[str]] = {}
    for attr, ours in _component_names(pipe).items():
        names = [n for n, a in state.adapters.items() if ours in set(a.network.components.values())]
        if names:
            out[attr] = names
    return out


def fuse_lora(pipe: Any, components: Sequence[str] | None = None, lora_scale: float = 1.0, safe_fusing: bool = False,
              adapter_names: Sequence[str] | None = None) -> None:
    """Bake adapters (the active ones, or `adapter_names`) into the weights of `components`
    (this pipeline class's Diffusers default when None), each at its weight x `lora_scale`.

    The weights from before are kept on the CPU: unfuse_lora restores them exactly.
    """
    state = _state(pipe)
    scale = finite_scale("fuse_lora: lora_scale", lora_scale)
    names = list(state.active) if adapter_names is None else _names(adapter_names)
    _known(state, names, "fuse_lora")
    if not state.enabled:
        raise RuntimeError("fuse_lora: the adapters are disabled; call pipe.enable_lora() first")
    _fuse(state, names, _our_components(pipe, components, "fuse_lora"), scale, safe=safe_fusing)
    _sync_fused(pipe, state)


def unfuse_lora(pipe: Any, components: Sequence[str] | None = None) -> None:
    """Restore the weights of `components` (this pipeline class's Diffusers default when None)
    bit for bit; their adapters compute again at the weights set_adapters gave them."""
    state = _state(pipe)
    _unfuse(state, _our_components(pipe, components, "unfuse_lora"))
    _sync_fused(pipe, state)


def unload_lora_weights(pipe: Any) -> None:
    """Remove every adapter. Unfused layers are exactly as before loading; fused layers keep
    the fused weights, as in Diffusers (call unfuse_lora first to get the originals back)."""
    state = _state(pipe)
    for name in list(state.adapters):
        _remove(state, name, keep_fused=True)
    state.originals.clear()
    state.enabled = True
    _sync_fused(pipe, state)


def delete_adapters(pipe: Any, adapter_names: str | Sequence[str]) -> None:
    """Remove the named adapters; the layers they patched are exactly as before they were loaded."""
    state = _state(pipe)
    names = _names(adapter_names)
    _known(state, names, "delete_adapters")
    fused = [n for n in names if n in state.fused()]
    if fused:
        raise RuntimeError(f"delete_adapters: {', '.join(map(repr, fused))} is fused into the weights; "
                           "call pipe.unfuse_lora() first")
    for name in names:
        _remove(state, name)


def disable_lora(pipe: Any) -> None:
    """Run the pipeline as if no adapter were loaded; fused layers are unfused first (as PEFT
    does), so the base weights are exactly the originals."""
    state = _state(pipe)
    _unfuse(state)
    state.enabled = False
    _apply_enabled(state)
    _sync_fused(pipe, state)


def enable_lora(pipe: Any) -> None:
    """Undo disable_lora: the active adapters compute again."""
    state = _state(pipe)
    state.enabled = True
    _apply_enabled(state)


def set_lora_device(pipe: Any, adapter_names: Sequence[str], device: torch.device | str | int) -> None:
    """Move the named adapters' tensors (they compute on their layer's device either way, but
    an adapter left elsewhere is copied over at each weight rebuild)."""
    state = _state(pipe)
    names = _names(adapter_names)
    _known(state, names, "set_lora_device")
    for name in names:
        state.adapters[name].network.to(device)


_FUNCTIONS = {name: globals()[name] for name in METHODS}


# -- installing ----------------------------------------------------------------------------------

def _peft_adapters(pipe: Any) -> dict[str, list[str]]:
    """Adapters Diffusers' own loader put on the pipeline's components (PEFT layers)."""
    out = {}
    for attr in _component_names(pipe):
        config = getattr(getattr(pipe, attr, None), "peft_config", None)
        if config:
            out[attr] = list(config)
    return out


def use_diffusers_api(pipe: Any) -> Any:
    """Give `pipe` Diffusers' adapter methods, driving lokr-diffusion adapters; returns `pipe`.

    From then on `pipe.load_lora_weights` loads through lokr-diffusion (LoKr, LoHa and LoRA in
    the LyCORIS, kohya, PEFT and Diffusers layouts). Only this object changes, not its class.
    A pipeline that already holds adapters loaded by Diffusers itself (PEFT layers) is refused:
    the two kinds cannot be driven as one set.
    """
    if isinstance(pipe, torch.nn.Module):
        raise TypeError(f"use_diffusers_api takes a Diffusers pipeline, got {type(pipe).__name__}")
    _components(pipe)  # a pipeline of a known family, or a clear error
    peft = _peft_adapters(pipe)
    if peft:
        raise ValueError(f"{type(pipe).__name__} holds adapters loaded by Diffusers' own loader ({peft}); "
                         "unload them (pipe.unload_lora_weights()) and load every file with lokr-diffusion")
    for name, function in _FUNCTIONS.items():
        object.__setattr__(pipe, name, MethodType(function, pipe))
    object.__setattr__(pipe, _INSTALLED, True)
    return pipe


def install_if_possible(pipe: Any) -> None:
    """What load_adapter calls: install the methods unless the pipeline also holds Diffusers'
    own adapters, in which case its methods keep driving those, and the user is told. Only
    DiffusionPipeline objects: any other holder of a denoiser is left as it is."""
    from diffusers import DiffusionPipeline

    if not isinstance(pipe, DiffusionPipeline) or getattr(pipe, _INSTALLED, False):
        return
    peft = _peft_adapters(pipe)
    if peft:
        logger.warning("%s also holds adapters loaded by Diffusers' own loader (%s): its set_adapters, fuse_lora "
                       "and the like keep driving those; use lokr_diffusion's functions (set_adapter_scale, "
                       "fuse_adapter, unload_adapter...) for the adapters load_adapter loaded",
                       type(pipe).__name__, peft)
        return
    use_diffusers_api(pipe)


__all__ = ["METHODS", "delete_adapters", "disable_lora", "enable_lora", "fuse_lora", "get_active_adapters",
           "get_list_adapters", "load_lora_weights", "set_adapters", "set_lora_device", "unfuse_lora",
           "unload_lora_weights", "use_diffusers_api"]

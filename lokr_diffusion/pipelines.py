"""LyCORIS adapters in Diffusers pipelines: load, scale, fuse, unfuse, unload, stack.

Works on the pipelines of every registered model family (the family names their denoiser and
text encoders: `unet` and `text_encoder`, + `text_encoder_2` for SDXL), their img2img/inpaint
variants, and on a bare denoiser or text encoder. Adapters are kept per
name on the object; each one is a forward hook per layer, so several stack and a new scale
takes effect without reloading. Fusing keeps a copy of the original weights (on the CPU), so
unfusing and unloading restore them bit for bit.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .errors import AdapterFileError
from .families import family_of_pipeline
from .loading import LoadReport, finite_scale, load_network
from .network import AdapterNetwork

_STATE_ATTR = "_lokr_diffusion_adapters"


@dataclass
class _Adapter:
    network: AdapterNetwork
    scale: float
    unet_scale: float | None
    text_encoder_scale: float | None
    report: LoadReport


@dataclass
class _State:
    adapters: dict[str, _Adapter] = field(default_factory=dict)
    fused: list[str] = field(default_factory=list)
    originals: dict[int, tuple[nn.Module, torch.Tensor]] = field(default_factory=dict)


def _components(pipe: Any) -> tuple[nn.Module | None, list[nn.Module]]:
    """(denoiser, text encoders) of a pipeline, or of a bare denoiser / text encoder.

    A pipeline's family says where its denoiser is (``unet``, ``transformer``) and the order of
    its text encoders, which is the order of the file's ``te1``, ``te2`` prefixes.
    """
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    if isinstance(pipe, PreTrainedModel):
        return None, [pipe]
    if isinstance(pipe, ModelMixin):
        return pipe, []
    if isinstance(pipe, nn.Module):
        raise TypeError(f"expected a Diffusers pipeline, a Diffusers denoiser or a transformers text encoder, "
                        f"got {type(pipe).__name__}")
    parts = family_of_pipeline(pipe).components(pipe)
    return parts.denoiser, parts.text_encoders


def _state(pipe: Any) -> _State:
    state = getattr(pipe, _STATE_ATTR, None)
    if state is None:
        state = _State()
        object.__setattr__(pipe, _STATE_ATTR, state)  # pipelines refuse unknown setattr via config otherwise
    return state


def _read_peft_folder(folder: Path) -> dict[str, torch.Tensor]:
    """A PEFT `save_pretrained` folder (adapter_config.json + adapter_model.safetensors), in the file layout.

    Read by lokr_diffusion.tools.peft, the reader `inspect` and `convert` use, so a folder
    loads here exactly as it converts (config checked, rank_pattern / alpha_pattern applied).
    """
    from .tools import peft

    tensors, config, _ = peft.read_peft(folder)
    groups = peft.group_peft(tensors, str(folder / peft.WEIGHTS_NAME))
    return peft.to_lycoris(groups, config, lambda path: "lora_unet")


def _check_scales(scale: float, unet_scale: float | None, text_encoder_scale: float | None) -> float:
    """The scales as floats; a NaN or inf one is refused before anything is attached."""
    finite_scale("scale", scale)
    for name, value in (("unet_scale", unet_scale), ("text_encoder_scale", text_encoder_scale)):
        if value is not None:
            finite_scale(name, value)
    return float(scale)


def _apply_scales(adapter: _Adapter) -> None:
    net = adapter.network
    net.set_multiplier(adapter.scale if adapter.unet_scale is None else adapter.unet_scale, "unet")
    net.set_multiplier(adapter.scale if adapter.text_encoder_scale is None else adapter.text_encoder_scale, "te")


def load_adapter(pipe: Any, path_or_state_dict: str | os.PathLike | Mapping[str, torch.Tensor], scale: float = 1.0,
                 adapter_name: str | None = None, unet_scale: float | None = None,
                 text_encoder_scale: float | None = None, strict: bool = False) -> LoadReport:
    """Attach a LoKr / LoHa / LoRA file (or state dict) to `pipe` under `adapter_name`.

    The adapter computes in float32 on the layer's device and adds its output in the
    layer's dtype. Returns the load report (modules patched per component, unmatched keys).
    """
    _check_scales(scale, unet_scale, text_encoder_scale)
    unet, tes = _components(pipe)
    state = _state(pipe)
    if state.fused:
        raise RuntimeError("unfuse_adapter(pipe) before loading another adapter")
    source: Any = path_or_state_dict
    if not isinstance(source, Mapping) and Path(source).is_dir():
        folder = Path(source)
        if not (folder / "adapter_config.json").exists():
            raise AdapterFileError(f"{folder}: a folder must be a PEFT adapter (adapter_config.json + "
                                   "adapter_model.safetensors); give the path of a .safetensors file otherwise")
        source = _read_peft_folder(folder)
    name = adapter_name or (Path(path_or_state_dict).stem if not isinstance(path_or_state_dict, Mapping) else None) \
        or f"adapter_{len(state.adapters)}"
    if name in state.adapters:
        raise ValueError(f"an adapter named {name!r} is already loaded; unload it or choose another adapter_name")
    network, report = load_network(source, unet=unet, text_encoders=tes, strict=strict)
    device = next(m.weight.device for m in (a.base for a in network.adapters()))
    network.to(device=device, dtype=torch.float32)
    adapter = _Adapter(network, float(scale), unet_scale, text_encoder_scale, report)
    _apply_scales(adapter)
    state.adapters[name] = adapter
    return report


def set_adapter_scale(pipe: Any, adapter_name: str, scale: float, unet_scale: float | None = None,
                      text_encoder_scale: float | None = None) -> None:
    """Change an adapter's strength; takes effect on the next forward, no reload."""
    _check_scales(scale, unet_scale, text_encoder_scale)
    state = _state(pipe)
    if adapter_name in state.fused:
        raise RuntimeError(f"adapter {adapter_name!r} is fused; unfuse_adapter(pipe) before changing its scale")
    adapter = _get(state, adapter_name)
    adapter.scale, adapter.unet_scale, adapter.text_encoder_scale = float(scale), unet_scale, text_encoder_scale
    _apply_scales(adapter)


def _get(state: _State, name: str) -> _Adapter:
    try:
        return state.adapters[name]
    except KeyError:
        raise KeyError(f"no adapter named {name!r}; loaded: {sorted(state.adapters) or 'none'}") from None


def list_adapters(pipe: Any) -> dict[str, dict[str, Any]]:
    """name -> {scale, unet_scale, text_encoder_scale, modules per component, fused}."""
    state = _state(pipe)
    return {name: {"scale": a.scale, "unet_scale": a.unet_scale, "text_encoder_scale": a.text_encoder_scale,
                   "modules": dict(a.report.patched), "fused": name in state.fused}
            for name, a in state.adapters.items()}


@torch.no_grad()
def fuse_adapter(pipe: Any, adapter_names: list[str] | None = None) -> None:
    """Bake adapters into the weights at their current scales: inference then costs nothing extra."""
    state = _state(pipe)
    names = list(state.adapters) if adapter_names is None else list(adapter_names)
    for name in names:
        if name in state.fused:
            continue
        adapter = _get(state, name)
        for a in adapter.network.adapters():
            w = a.base.weight
            if id(a.base) not in state.originals:
                state.originals[id(a.base)] = (a.base, w.detach().to("cpu", copy=True))
            a.merge()
        state.fused.append(name)


@torch.no_grad()
def unfuse_adapter(pipe: Any) -> None:
    """Restore the weights saved at fuse time, exactly, and switch the adapters back to hooks."""
    state = _state(pipe)
    for module, original in state.originals.values():
        module.weight.copy_(original.to(module.weight.device))
    state.originals.clear()
    for name in state.fused:
        for a in state.adapters[name].network.adapters():
            a.merged = False
    state.fused.clear()


def unload_adapter(pipe: Any, adapter_name: str | None = None) -> None:
    """Remove one adapter (or all): the model's weights are exactly as before loading."""
    state = _state(pipe)
    if state.fused:
        unfuse_adapter(pipe)
    names = list(state.adapters) if adapter_name is None else [adapter_name]
    for name in names:
        _get(state, name).network.remove()
        del state.adapters[name]


__all__ = ["fuse_adapter", "list_adapters", "load_adapter", "set_adapter_scale", "unfuse_adapter", "unload_adapter"]

"""LyCORIS adapters in Diffusers pipelines: load, scale, fuse, unfuse, unload, stack.

Works on the pipelines of every registered model family (the family names their denoiser and
text encoders: `unet` and `text_encoder`, + `text_encoder_2` for SDXL), their img2img/inpaint
variants, and on a bare denoiser or text encoder. Adapters are kept per
name on the object; each one is a forward hook per layer, so several stack and a new scale
takes effect without reloading. Fusing keeps a copy of the original weights (on the CPU), so
unfusing and unloading restore them bit for bit.

The state kept here (names, which are active, scales per component, what is fused) is also what
`lokr_diffusion.diffusers_api` drives under Diffusers' method names (`pipe.set_adapters`...), so
both APIs see the same adapters.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .errors import AdapterFileError
from .layers import AdapterModule
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
    # per-component multipliers (component: "unet", "te", "te1"...), set by Diffusers-style
    # set_adapters weights such as {"unet": 0.8, "text_encoder": 0.5}; they win over the three above
    component_scales: dict[str, float] = field(default_factory=dict)


@dataclass
class _State:
    adapters: dict[str, _Adapter] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)  # the adapters that compute, in set_adapters order
    enabled: bool = True  # False after disable_lora: no adapter computes, none is forgotten
    # id(layer) -> (layer, its weight before the first fuse, on the CPU; its component)
    originals: dict[int, tuple[nn.Module, torch.Tensor, str]] = field(default_factory=dict)

    def fused(self) -> list[str]:
        """Names of the adapters with at least one layer baked into the weights."""
        return [n for n, a in self.adapters.items() if any(m.merged for m in a.network.adapters())]


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


def _multiplier(adapter: _Adapter, component: str) -> float:
    if component in adapter.component_scales:
        return adapter.component_scales[component]
    part = adapter.unet_scale if component == "unet" else adapter.text_encoder_scale
    return adapter.scale if part is None else part


def _apply_scales(adapter: _Adapter) -> None:
    net = adapter.network
    for a in net.adapters():
        if a.merged:
            raise RuntimeError("unfuse before changing the multiplier of a fused adapter")
        a.multiplier = _multiplier(adapter, net.components[a.key])


def _apply_enabled(state: _State) -> None:
    """An adapter computes when it is active and the pipeline's adapters are enabled."""
    for name, adapter in state.adapters.items():
        adapter.network.set_enabled(state.enabled and name in state.active)


def _sync_fused(pipe: Any, state: _State) -> None:
    """Keep a pipeline's own `fused_loras` / `num_fused_loras` (Diffusers' LoraBaseMixin reads
    `_merged_adapters`) telling the truth about the adapters fused here."""
    if hasattr(type(pipe), "fused_loras"):
        object.__setattr__(pipe, "_merged_adapters", set(state.fused()))


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
    if state.fused():
        raise RuntimeError("unfuse first (unfuse_adapter(pipe), or pipe.unfuse_lora()) before loading another adapter")
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
    state.active.append(name)
    _apply_enabled(state)
    if not isinstance(pipe, nn.Module):  # a pipeline: its Diffusers adapter methods now drive these adapters
        from .diffusers_api import install_if_possible

        install_if_possible(pipe)
    return report


def set_adapter_scale(pipe: Any, adapter_name: str, scale: float, unet_scale: float | None = None,
                      text_encoder_scale: float | None = None) -> None:
    """Change an adapter's strength; takes effect on the next forward, no reload."""
    _check_scales(scale, unet_scale, text_encoder_scale)
    state = _state(pipe)
    if adapter_name in state.fused():
        raise RuntimeError(f"adapter {adapter_name!r} is fused; unfuse_adapter(pipe) before changing its scale")
    adapter = _get(state, adapter_name)
    adapter.scale, adapter.unet_scale, adapter.text_encoder_scale = float(scale), unet_scale, text_encoder_scale
    adapter.component_scales = {}
    _apply_scales(adapter)


def _get(state: _State, name: str) -> _Adapter:
    try:
        return state.adapters[name]
    except KeyError:
        raise KeyError(f"no adapter named {name!r}; loaded: {sorted(state.adapters) or 'none'}") from None


def list_adapters(pipe: Any) -> dict[str, dict[str, Any]]:
    """name -> {scale, unet_scale, text_encoder_scale, modules per component, fused, active}."""
    state = _state(pipe)
    fused = state.fused()
    return {name: {"scale": a.scale, "unet_scale": a.unet_scale, "text_encoder_scale": a.text_encoder_scale,
                   "modules": dict(a.report.patched), "fused": name in fused, "active": name in state.active}
            for name, a in state.adapters.items()}


@torch.no_grad()
def _fuse(state: _State, names: list[str], components: set[str] | None = None, lora_scale: float = 1.0,
          safe: bool = False) -> None:
    """Bake the named adapters' layers of `components` (all when None) into the weights at
    multiplier x `lora_scale`, keeping each layer's weight from before its first fuse.

    With `safe`, every weight is first rebuilt aside and checked: an update that overflows the
    weight's dtype (or is NaN) is refused before any weight changes.
    """
    chosen = [(net.components[a.key], a) for net in (_get(state, name).network for name in names)
              for a in net.adapters() if not a.merged and (components is None or net.components[a.key] in components)]
    if safe:
        by_layer: dict[int, list[AdapterModule]] = {}
        for _, a in chosen:
            by_layer.setdefault(id(a.base), []).append(a)
        for group in by_layer.values():
            w = group[0].base.weight
            new = w.float() + sum(a.multiplier * lora_scale * a.delta_weight().float().to(w.device) for a in group)
            if not torch.isfinite(new.to(w.dtype)).all():
                raise ValueError(f"fusing would make the weight of {', '.join(a.key for a in group)} non-finite "
                                 f"(NaN or beyond {w.dtype}); nothing was fused")
    for component, a in chosen:
        if id(a.base) not in state.originals:
            state.originals[id(a.base)] = (a.base, a.base.weight.detach().to("cpu", copy=True), component)
        a.merge(a.multiplier * lora_scale)


@torch.no_grad()
def _unfuse(state: _State, components: set[str] | None = None) -> None:
    """Restore the weights saved at fuse time (of `components`, all when None), bit for bit,
    and switch their adapters back to hooks at their set multipliers."""
    for key, (module, original, component) in list(state.originals.items()):
        if components is None or component in components:
            module.weight.copy_(original.to(module.weight.device))
            del state.originals[key]
    for adapter in state.adapters.values():
        for a in adapter.network.adapters():
            if a.merged and (components is None or adapter.network.components[a.key] in components):
                a.merged = False


def fuse_adapter(pipe: Any, adapter_names: list[str] | None = None) -> None:
    """Bake adapters (the active ones by default) into the weights at their current scales:
    inference then costs nothing extra."""
    state = _state(pipe)
    _fuse(state, list(state.active) if adapter_names is None else list(adapter_names))
    _sync_fused(pipe, state)


def unfuse_adapter(pipe: Any) -> None:
    """Restore the weights saved at fuse time, exactly, and switch the adapters back to hooks."""
    state = _state(pipe)
    _unfuse(state)
    _sync_fused(pipe, state)


def _remove(state: _State, name: str, keep_fused: bool = False) -> None:
    """Take one adapter out. A fused layer keeps the update in its weight with `keep_fused`
    (what Diffusers' unload after fuse does); otherwise the caller unfuses first."""
    adapter = _get(state, name)
    for a in adapter.network.adapters():
        if a.merged and keep_fused:
            a.merged = False  # the weight keeps the update; remove() must not subtract it
    adapter.network.remove()
    del state.adapters[name]
    if name in state.active:
        state.active.remove(name)


def unload_adapter(pipe: Any, adapter_name: str | None = None) -> None:
    """Remove one adapter (or all): the model's weights are exactly as before loading."""
    state = _state(pipe)
    if adapter_name is not None:
        _get(state, adapter_name)
    if state.fused():
        _unfuse(state)
    for name in list(state.adapters) if adapter_name is None else [adapter_name]:
        _remove(state, name)
    _sync_fused(pipe, state)


__all__ = ["fuse_adapter", "list_adapters", "load_adapter", "set_adapter_scale", "unfuse_adapter", "unload_adapter"]

"""Adapter files -> AdapterNetwork: match keys to modules, check every tensor, report.

Accepts what the tools in the wild write: `lora_unet_` with diffusers or ldm names,
`lycoris_`, `lora_te_`/`lora_te1_`/`lora_te2_` with or without `text_model_`, LoKr (incl.
Tucker and 4-D w2_b), LoHa and LoRA/LoCon, and PEFT LoKr state dicts.
"""
from __future__ import annotations

import difflib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from .algos import detect_algorithm
from .errors import AdapterFileError, ConfigError
from .families import Family, family_of_adapter_keys
from .fileformat import read_safetensors
from .layers import AdapterModule
from .network import AdapterNetwork, component_models, family_of
from .targets import Target
from .tools.adapterfile import FACTOR_DTYPES, alpha_problem, dtype_name
from .tools.peft import from_peft, is_peft_layout

__all__ = ["LoadReport", "build_alias_table", "check_module_tensors", "finite_scale", "from_peft",
           "load_network", "network_from_tensors"]  # from_peft lives in tools.peft, the one PEFT reader

logger = logging.getLogger(__name__)

_IGNORED_TENSORS = {"scale", "bias", "on_input"}  # written by some tools, never needed to rebuild dW


@dataclass
class LoadReport:
    """What a load did: modules patched per component, and what it could not use."""

    source: str
    patched: dict[str, int] = field(default_factory=dict)
    algorithms: dict[str, int] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    ignored_tensors: list[str] = field(default_factory=list)
    family: str | None = None

    def __str__(self) -> str:
        parts = ", ".join(f"{n} {c}" for c, n in sorted((c, n) for c, n in self.patched.items()))
        algos = ", ".join(f"{a} {n}" for a, n in sorted(self.algorithms.items()))
        s = f"{self.source}: patched {sum(self.patched.values())} modules ({parts}; {algos})"
        if self.unmatched:
            s += f"; {len(self.unmatched)} keys matched no module"
        return s


def _split_key(key: str) -> tuple[str, str]:
    module, sep, tensor = key.partition(".")
    if not sep:
        raise AdapterFileError(f"key {key!r} is not of the form <module key>.<tensor name>")
    return module, tensor


def finite_scale(name: str, value: object) -> float:
    """`value` as a float, refused with a ConfigError naming it when it is not a finite number.

    A NaN or inf strength would silently turn every patched weight into NaN/inf.
    """
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a finite number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return number


def build_alias_table(unet: nn.Module | None, text_encoders: Sequence[nn.Module],
                      family: Family | None = None) -> dict[str, tuple[Target, str]]:
    """Every accepted key -> (target module, the key we write for it)."""
    table: dict[str, tuple[Target, str]] = {}
    family = family or family_of(unet, text_encoders)
    for component, model, key_of, aliases_of in component_models(family, unet, text_encoders):
        for path, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                target = Target(component, path, module)
                canonical = key_of(path)
                for alias in aliases_of(path):
                    table.setdefault(alias, (target, canonical))
    return table


def check_module_tensors(source: str, key: str, base: nn.Module, tensors: dict[str, torch.Tensor]):
    """The algorithm of one module's tensors, after checking they rebuild a weight of the right shape."""
    names = set(tensors)
    if "dora_scale" in names:
        raise AdapterFileError(f"{source}: module {key} uses DoRA (dora_scale), which lokr-diffusion does not apply; "
                               "the tools disagree on its meaning, so loading it without would give wrong weights")
    algo = detect_algorithm(names)
    if algo is None:
        raise AdapterFileError(f"{source}: module {key} has tensors {sorted(names)}, which are no LoKr "
                               "(lokr_w1/lokr_w2...), LoHa (hada_w1_a...) or LoRA (lora_down/lora_up) set")
    weight_shape = tuple(base.weight.shape)
    for n, t in sorted(tensors.items()):  # a 0-dim or empty factor would crash the shape check below
        if n in algo.TENSOR_NAMES and (t.dim() < 2 or 0 in t.shape):
            raise AdapterFileError(f"{source}: module {key}: tensor {n} has shape {tuple(t.shape)}; expected a 2-D or "
                                   "4-D factor with no empty dimension")
    meta = {n: torch.empty(t.shape, device="meta") for n, t in tensors.items()}
    try:
        dw = algo.delta_weight(meta, weight_shape)
    except KeyError as exc:
        raise AdapterFileError(f"{source}: module {key} ({algo.NAME}) is missing tensor {exc.args[0]!r}; "
                               f"it has {sorted(names)}") from None
    except (RuntimeError, ValueError, IndexError, ZeroDivisionError) as exc:
        found = ", ".join(f"{n} {tuple(t.shape)}" for n, t in sorted(tensors.items()))
        raise AdapterFileError(f"{source}: module {key}: tensors do not fit the model's weight of shape "
                               f"{weight_shape} (found {found}; {exc})") from None
    if tuple(dw.shape) != weight_shape:
        raise AdapterFileError(f"{source}: module {key}: tensors rebuild a weight of shape {tuple(dw.shape)}, "
                               f"expected {weight_shape}")
    for n, t in sorted(tensors.items()):
        if t.dtype not in FACTOR_DTYPES:  # float8 and bool too: no loader applies them
            raise AdapterFileError(f"{source}: module {key}: tensor {n} has dtype {t.dtype}, expected a "
                                   f"float type ({', '.join(dtype_name(d) for d in FACTOR_DTYPES)})")
        if not torch.isfinite(t).all():
            raise AdapterFileError(f"{source}: module {key}: tensor {n} has non-finite values (NaN or inf)")
    return algo


def network_from_tensors(tensors: Mapping[str, torch.Tensor], unet: nn.Module | None = None,
                         text_encoders: Sequence[nn.Module] = (), metadata: Mapping[str, str] | None = None,
                         source: str = "state dict", strict: bool = False, multiplier: float = 1.0,
                         dtype: torch.dtype = torch.float32) -> tuple[AdapterNetwork, LoadReport]:
    """Build (and attach) an AdapterNetwork from file-layout tensors; nothing is attached on error."""
    text_encoders = tuple(text_encoders)
    finite_scale("multiplier", multiplier)
    if is_peft_layout(tensors):
        tensors = from_peft(tensors, source=source)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        module, tensor = _split_key(key)
        groups.setdefault(module, {})[tensor] = t
    family = family_of(unet, text_encoders)
    file_family = family_of_adapter_keys(list(groups), metadata)
    report = LoadReport(source=source, family=file_family.title if file_family.candidates else None)
    if not file_family.allows(family):
        raise AdapterFileError(f"{source}: the file is for {file_family.title}, but the model is {family.title}")
    table = build_alias_table(unet, text_encoders, family)
    network = AdapterNetwork(family)
    pending: list[tuple[Target, AdapterModule]] = []
    seen: dict[int, str] = {}
    for module_key, group in groups.items():
        hit = table.get(module_key)
        if hit is None:
            report.unmatched.append(module_key)
            continue
        target, canonical = hit
        if id(target.module) in seen:
            raise AdapterFileError(f"{source}: modules {seen[id(target.module)]} and {module_key} both patch "
                                   f"{target.component} module {target.path}")
        seen[id(target.module)] = module_key
        group = dict(group)
        alpha_t = group.pop("alpha", None)
        for name in sorted(set(group) & _IGNORED_TENSORS):
            group.pop(name)
            report.ignored_tensors.append(f"{module_key}.{name}")
        algo = check_module_tensors(source, module_key, target.module, group)
        unknown = set(group) - set(algo.TENSOR_NAMES)
        if unknown:
            raise AdapterFileError(f"{source}: module {module_key} has unknown tensors {sorted(unknown)} "
                                   f"for {algo.NAME} (expected some of {list(algo.TENSOR_NAMES)})")
        params = {n: t.to(dtype) for n, t in group.items()}
        r = algo.rank(params)
        if alpha_t is None:
            alpha = float(r) if r is not None else 1.0  # the UIs' default: scale 1
            logger.warning("%s: module %s has no alpha; using scale 1", source, module_key)
        else:
            problem = alpha_problem(alpha_t)
            if problem is not None:
                raise AdapterFileError(f"{source}: module {module_key}: {problem}")
            alpha = float(alpha_t.float().reshape(()))
            if alpha != alpha or alpha in (float("inf"), float("-inf")):
                raise AdapterFileError(f"{source}: {module_key}.alpha is not finite")
        device = target.module.weight.device
        params = {n: t.to(device) for n, t in params.items()}
        pending.append((target, AdapterModule(canonical, target.module, algo, params, alpha, multiplier=multiplier)))
        report.patched[target.component] = report.patched.get(target.component, 0) + 1
        report.algorithms[algo.NAME] = report.algorithms.get(algo.NAME, 0) + 1
    if report.unmatched:
        names = sorted(table)
        hints = []
        for k in report.unmatched[:10]:
            close = difflib.get_close_matches(k, names, n=2, cutoff=0.6)
            hints.append(f"  {k}" + (f" (closest: {', '.join(close)})" if close else ""))
        more = f"\n  ... and {len(report.unmatched) - 10} more" if len(report.unmatched) > 10 else ""
        msg = (f"{source}: {len(report.unmatched)} of {len(groups)} modules in the file match no module of the "
               f"model:\n" + "\n".join(hints) + more)
        if strict:
            raise AdapterFileError(msg)
        logger.warning(msg)
    if not pending:
        raise AdapterFileError(f"{source}: no module of the file matches the model (looked for keys like "
                               f"{', '.join(sorted(table)[:3])}, ...)")
    for target, adapter in pending:
        network.add_adapter(target, adapter.key, adapter)
    return network, report


def load_network(path_or_tensors: str | os.PathLike | Mapping[str, torch.Tensor], unet: nn.Module | None = None,
                 text_encoders: Sequence[nn.Module] = (), strict: bool = False, multiplier: float = 1.0,
                 allow_pickle: bool = False) -> tuple[AdapterNetwork, LoadReport]:
    """Read an adapter file (or state dict) and attach it to the given models."""
    if isinstance(path_or_tensors, Mapping):
        return network_from_tensors(path_or_tensors, unet, text_encoders, strict=strict, multiplier=multiplier)
    tensors, metadata = read_safetensors(path_or_tensors, allow_pickle=allow_pickle)
    return network_from_tensors(tensors, unet, text_encoders, metadata=metadata, source=str(Path(path_or_tensors)),
                                strict=strict, multiplier=multiplier)

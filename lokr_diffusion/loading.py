"""Adapter files -> AdapterNetwork: match keys to modules, check every tensor, report.

Accepts what the tools in the wild write: `lora_unet_` with diffusers or ldm names,
`lycoris_`, `lora_te_`/`lora_te1_`/`lora_te2_` with or without `text_model_`, LoKr (incl.
Tucker and 4-D w2_b), LoHa and LoRA/LoCon, and PEFT LoKr state dicts; module keys may contain
dots (`transformer.transformer_blocks.0.attn.to_q.lokr_w1`), and a module of a family's fused
original layer (Flux's `img_attn.qkv`) is applied to the Diffusers layers as row slices.
"""
from __future__ import annotations

import difflib
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Container, Mapping, Sequence

import torch
from torch import nn

from .algos import ALGORITHMS, Algorithm, detect_algorithm, scalar_target
from .errors import AdapterFileError, ConfigError
from .families import Family, family_of_adapter_keys
from .fileformat import read_safetensors
from .layers import AdapterModule, RowSliceAdapter
from .network import AdapterNetwork, component_models, family_of
from .targets import Target
from .tools.adapterfile import FACTOR_DTYPES, alpha_problem, dtype_name
from .tools.peft import from_peft, is_peft_layout

# from_peft lives in tools.peft, the one PEFT reader
__all__ = ["FusedTarget", "InitReport", "LoadReport", "init_from_file", "build_alias_table", "build_fused_table", "check_module_tensors",
           "finite_scale", "from_peft", "load_network", "network_from_tensors", "split_key"]

logger = logging.getLogger(__name__)

_IGNORED_TENSORS = {"scale", "bias", "on_input"}  # written by some tools, never needed to rebuild dW
_TENSOR_NAMES = frozenset({n for a in ALGORITHMS.values() for n in a.TENSOR_NAMES} | {"alpha", "dora_scale"}
                          | _IGNORED_TENSORS)


@dataclass
class LoadReport:
    """What a load did: modules patched per component, and what it could not use."""

    source: str
    patched: dict[str, int] = field(default_factory=dict)
    algorithms: dict[str, int] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    ignored_tensors: list[str] = field(default_factory=list)
    family: str | None = None
    fused: dict[str, int] = field(default_factory=dict)  # file key of a fused layer -> modules it patched
    without_alpha: list[str] = field(default_factory=list)  # modules applied at scale 1 for want of an alpha

    def __str__(self) -> str:
        parts = ", ".join(f"{n} {c}" for c, n in sorted((c, n) for c, n in self.patched.items()))
        algos = ", ".join(f"{a} {n}" for a, n in sorted(self.algorithms.items()))
        s = f"{self.source}: patched {sum(self.patched.values())} modules ({parts}; {algos})"
        if self.fused:
            s += (f"; {len(self.fused)} of them fused layers of the original model, applied to "
                  f"{sum(self.fused.values())} modules by rows")
        if self.unmatched:
            s += f"; {len(self.unmatched)} keys matched no module"
        return s


# LoRA tensor names of Diffusers / PEFT state dicts (`transformer.<path>.lora_A.weight`, as Diffusers'
# save_lora_weights and ai-toolkit write them; `lora_A.default.weight`, PEFT's adapter name kept, which
# ComfyUI reads for Qwen-Image) and of older Diffusers attention processors
_LORA_TENSOR_NAMES = {".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight",
                     ".lora_A.default.weight": ".lora_down.weight", ".lora_B.default.weight": ".lora_up.weight",
                      ".lora.down.weight": ".lora_down.weight", ".lora.up.weight": ".lora_up.weight"}


def _lora_tensor_names(key: str) -> str:
    """The LyCORIS tensor name for a Diffusers/PEFT LoRA key; other keys unchanged."""
    for theirs, ours in _LORA_TENSOR_NAMES.items():
        if key.endswith(theirs):
            return key[: -len(theirs)] + ours
    return key


def split_key(key: str, module_keys: Container[str] = ()) -> tuple[str, str]:
    """(module key, tensor name) of a file key; module keys may contain dots.

    The split is the longest prefix that is one of `module_keys` (the keys the model accepts),
    else the one leaving a known tensor name (`lokr_w1`, `lora_down.weight`, `alpha`...), else
    the last dot. Known module keys come first so that an unknown tensor of a known module
    (`<module>.lora_up.bias`) is reported as such rather than as an unknown module.
    """
    parts = key.split(".")
    if len(parts) < 2:
        raise AdapterFileError(f"key {key!r} is not of the form <module key>.<tensor name>")
    splits = [(".".join(parts[:i]), ".".join(parts[i:])) for i in range(len(parts) - 1, 0, -1)]
    return (next((s for s in splits if s[0] in module_keys), None)
            or next((s for s in splits if s[1] in _TENSOR_NAMES), splits[0]))


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


@dataclass(frozen=True)
class FusedTarget:
    """A file module over one fused layer of the original model that the denoiser splits."""

    shape: tuple[int, ...]  # the fused weight: every slice's rows x the layers' input dimensions
    slices: tuple[tuple[Target, str, tuple[tuple[int, int], ...]], ...]  # (layer, its key, its row ranges)

    def describe(self) -> str:
        return f"the fused weight of {', '.join(t.path for t, _, _ in self.slices)}"


def build_fused_table(unet: nn.Module | None, family: Family) -> dict[str, FusedTarget]:
    """Every file key of a fused original layer (``Family.fused_groups``) -> the layers it patches.

    A family whose row table does not fit the model (a slice length other than the layer's
    output size) is a bug of the family, refused here rather than applied to the wrong rows.
    """
    table: dict[str, FusedTarget] = {}
    for key, slices in (family.fused_groups(unet) if unet is not None else {}).items():
        ranges: dict[str, list[tuple[int, int]]] = {}
        for path, start, stop in slices:
            ranges.setdefault(path, []).append((start, stop))
        parts = []
        for path, rows in ranges.items():
            module = unet.get_submodule(path)
            n = sum(stop - start for start, stop in rows)
            if n != module.weight.shape[0]:
                raise ValueError(f"{family.title}: fused file module {key} gives {path} {n} rows, but the layer "
                                 f"has {module.weight.shape[0]} outputs")
            parts.append((Target("unet", path, module), family.denoiser_key(path, unet), tuple(rows)))
        inner = {tuple(t.module.weight.shape[1:]) for t, _, _ in parts}
        if len(inner) != 1:
            raise ValueError(f"{family.title}: fused file module {key} covers layers of different input shapes {inner}")
        table[key] = FusedTarget((max(stop for _, _, stop in slices), *inner.pop()), tuple(parts))
    return table


def check_module_tensors(source: str, key: str, weight_shape: tuple[int, ...], tensors: dict[str, torch.Tensor],
                         weight: str = "the model's weight") -> Algorithm:
    """The algorithm of one module's tensors, after checking they rebuild a weight of `weight_shape`
    (`weight` says whose, for the messages)."""
    names = set(tensors)
    if "dora_scale" in names:
        raise AdapterFileError(f"{source}: module {key} uses DoRA (dora_scale), which lokr-diffusion does not apply; "
                               "the tools disagree on its meaning, so loading it without would give wrong weights")
    algo = detect_algorithm(names)
    if algo is None:
        raise AdapterFileError(f"{source}: module {key} has tensors {sorted(names)}, which are no LoKr "
                               "(lokr_w1/lokr_w2...), LoHa (hada_w1_a...) or LoRA (lora_down/lora_up) set")
    weight_shape = tuple(weight_shape)
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
        raise AdapterFileError(f"{source}: module {key}: tensors do not fit {weight} of shape "
                               f"{weight_shape} (found {found}; {exc})") from None
    if tuple(dw.shape) != weight_shape:
        raise AdapterFileError(f"{source}: module {key}: tensors rebuild a weight of shape {tuple(dw.shape)}, "
                               f"expected {weight_shape} ({weight})")
    for n, t in sorted(tensors.items()):
        if t.dtype not in FACTOR_DTYPES:  # float8 and bool too: no loader applies them
            raise AdapterFileError(f"{source}: module {key}: tensor {n} has dtype {t.dtype}, expected a "
                                   f"float type ({', '.join(dtype_name(d) for d in FACTOR_DTYPES)})")
        if not torch.isfinite(t).all():
            raise AdapterFileError(f"{source}: module {key}: tensor {n} has non-finite values (NaN or inf)")
    return algo


def _module_params(source: str, module_key: str, group: dict[str, torch.Tensor], weight_shape: tuple[int, ...],
                   weight: str, dtype: torch.dtype,
                   report: LoadReport) -> tuple[Algorithm, dict[str, torch.Tensor], float]:
    """(algorithm, factors in `dtype`, alpha) of one file module, every tensor checked."""
    group = dict(group)
    alpha_t = group.pop("alpha", None)
    for name in sorted(set(group) & _IGNORED_TENSORS):
        group.pop(name)
        report.ignored_tensors.append(f"{module_key}.{name}")
    algo = check_module_tensors(source, module_key, weight_shape, group, weight)
    unknown = set(group) - set(algo.TENSOR_NAMES)
    if unknown:
        raise AdapterFileError(f"{source}: module {module_key} has unknown tensors {sorted(unknown)} "
                               f"for {algo.NAME} (expected some of {list(algo.TENSOR_NAMES)})")
    params = {n: t.to(dtype) for n, t in group.items()}
    r = algo.rank(params)
    if alpha_t is None:
        report.without_alpha.append(module_key)
        return algo, params, float(r) if r is not None else 1.0  # the UIs' default: scale 1
    problem = alpha_problem(alpha_t)
    if problem is not None:
        raise AdapterFileError(f"{source}: module {module_key}: {problem}")
    alpha = float(alpha_t.float().reshape(()))
    if not math.isfinite(alpha):
        raise AdapterFileError(f"{source}: {module_key}.alpha is not finite")
    return algo, params, alpha


def _unmatched_message(source: str, unmatched: list[str], known: list[str], total: int,
                       family: Family | None = None) -> str:
    hints = []
    for k in unmatched[:10]:
        reason = family.unmatched_reason(k) if family is not None else None
        if reason:
            hints.append(f"  {k} ({reason})")
            continue
        close = difflib.get_close_matches(k, known, n=2, cutoff=0.6)
        hints.append(f"  {k}" + (f" (closest: {', '.join(close)})" if close else ""))
    more = f"\n  ... and {len(unmatched) - 10} more" if len(unmatched) > 10 else ""
    return (f"{source}: {len(unmatched)} of {total} modules in the file match no module of the model:\n"
            + "\n".join(hints) + more)


def network_from_tensors(tensors: Mapping[str, torch.Tensor], unet: nn.Module | None = None,
                         text_encoders: Sequence[nn.Module] = (), metadata: Mapping[str, str] | None = None,
                         source: str = "state dict", strict: bool = False, multiplier: float = 1.0,
                         dtype: torch.dtype = torch.float32,
                         family: Family | None = None) -> tuple[AdapterNetwork, LoadReport]:
    """Build (and attach) an AdapterNetwork from file-layout tensors; nothing is attached on error.

    `family` overrides the detection from the models. A file module of a fused original layer
    becomes one RowSliceAdapter per denoiser layer it covers, all sharing its factors.
    """
    text_encoders = tuple(text_encoders)
    finite_scale("multiplier", multiplier)
    if is_peft_layout(list(tensors)):
        tensors = from_peft(tensors, source=source)
    else:
        tensors = {_lora_tensor_names(k): t for k, t in tensors.items()}
    family = family or family_of(unet, text_encoders)
    table = build_alias_table(unet, text_encoders, family)
    fused = build_fused_table(unet, family)
    module_keys = table.keys() | fused.keys()
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        module, tensor = split_key(key, module_keys)
        groups.setdefault(module, {})[tensor] = t
    file_family = family_of_adapter_keys(list(groups), metadata)
    report = LoadReport(source=source, family=file_family.title if file_family.candidates else None)
    if not file_family.allows(family):
        raise AdapterFileError(f"{source}: the file is for {file_family.title}, but the model is {family.title}")
    network = AdapterNetwork(family)
    pending: list[tuple[Target, AdapterModule]] = []
    seen: dict[int, str] = {}
    for module_key, group in groups.items():
        if module_key in table:
            target, canonical = table[module_key]
            shape, weight = tuple(target.module.weight.shape), "the model's weight"
            slices: tuple = ((target, canonical, None),)
        elif module_key in fused:
            shape, weight, slices = fused[module_key].shape, fused[module_key].describe(), fused[module_key].slices
        else:
            report.unmatched.append(module_key)
            continue
        for target, _, _ in slices:
            if id(target.module) in seen:
                raise AdapterFileError(f"{source}: modules {seen[id(target.module)]} and {module_key} both patch "
                                       f"{target.component} module {target.path}")
            seen[id(target.module)] = module_key
        algo, params, alpha = _module_params(source, module_key, group, shape, weight, dtype, report)
        device = slices[0][0].module.weight.device
        params = {n: nn.Parameter(t.to(device)) for n, t in params.items()}  # one set, shared by the slices
        for target, canonical, rows in slices:
            if rows is None:
                adapter = AdapterModule(canonical, target.module, algo, params, alpha, multiplier=multiplier)
            else:
                adapter = RowSliceAdapter(canonical, target.module, algo, params, alpha, rows, shape,
                                          multiplier=multiplier)
            pending.append((target, adapter))
        if slices[0][2] is not None:
            report.fused[module_key] = len(slices)
        component = slices[0][0].component
        report.patched[component] = report.patched.get(component, 0) + 1
        report.algorithms[algo.NAME] = report.algorithms.get(algo.NAME, 0) + 1
    if report.without_alpha:  # Diffusers / PEFT LoRA files store none: their scale is 1
        logger.warning("%s: %d module(s) have no alpha (e.g. %s); using scale 1, as the UIs do", source,
                       len(report.without_alpha), report.without_alpha[0])
    known = sorted(table) + sorted(fused)
    if report.unmatched:
        msg = _unmatched_message(source, report.unmatched, known, len(groups), family)
        if strict:
            raise AdapterFileError(msg)
        logger.warning(msg)
    if not pending:
        raise AdapterFileError(f"{source}: no module of the file matches the model (looked for keys like "
                               f"{', '.join(known[:3])}, ...)")
    for target, adapter in pending:
        network.add_adapter(target, adapter.key, adapter)
    return network, report


def load_network(path_or_tensors: str | os.PathLike | Mapping[str, torch.Tensor], unet: nn.Module | None = None,
                 text_encoders: Sequence[nn.Module] = (), strict: bool = False, multiplier: float = 1.0,
                 allow_pickle: bool = False, family: Family | None = None) -> tuple[AdapterNetwork, LoadReport]:
    """Read an adapter file (or state dict) and attach it to the given models (`family`: see
    `network_from_tensors`)."""
    if isinstance(path_or_tensors, Mapping):
        return network_from_tensors(path_or_tensors, unet, text_encoders, strict=strict, multiplier=multiplier,
                                    family=family)
    tensors, metadata = read_safetensors(path_or_tensors, allow_pickle=allow_pickle)
    return network_from_tensors(tensors, unet, text_encoders, metadata=metadata, source=str(Path(path_or_tensors)),
                                strict=strict, multiplier=multiplier, family=family)


@dataclass
class InitReport:
    """What `init_from_file` did: modules started from the file, and those that start fresh."""

    source: str
    loaded: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        s = f"{self.source}: {len(self.loaded)} modules start from the file"
        if self.fresh:
            s += (f"; {len(self.fresh)} modules of the config are not in it and start fresh (e.g. "
                  f"{', '.join(self.fresh[:3])})")
        return s


def init_from_file(network: AdapterNetwork, path: str | os.PathLike, unet: nn.Module | None = None,
                   text_encoders: Sequence[nn.Module] = ()) -> InitReport:
    """Start `network` (fresh from `create_network`) from an adapter file: ours or another tool's.

    Every module of the file must be one the network trains, with the same algorithm and the
    same tensor shapes (the config decides them; a mismatch is an error naming each module and
    both shapes). Modules of the network the file lacks keep their fresh start (the report lists
    them). The file's scale is folded into one factor (`scalar_target`), so the update starts
    equal to the file's while alpha stays the config's; a `use_scalar` scalar starts at 1. The
    models are the ones the network is attached to, for the file's key spellings.
    """
    source = str(Path(path))
    tensors, metadata = read_safetensors(path)
    if is_peft_layout(list(tensors)):
        tensors = from_peft(tensors, source=source)
    else:
        tensors = {_lora_tensor_names(k): t for k, t in tensors.items()}
    table = build_alias_table(unet, tuple(text_encoders), network.family)
    fused = build_fused_table(unet, network.family)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        module, tensor = split_key(key, table.keys() | fused.keys())
        groups.setdefault(module, {})[tensor] = t
    file_family = family_of_adapter_keys(list(groups), metadata)
    if not file_family.allows(network.family):
        raise ConfigError(f"network.init_from: {source} is for {file_family.title}, but the model is "
                          f"{network.family.title}")
    ours = set(network.module_keys())
    report, load_report = InitReport(source), LoadReport(source)
    problems: list[str] = []
    chosen: dict[str, tuple[dict[str, torch.Tensor], float]] = {}
    for module_key, group in groups.items():
        canonical = table[module_key][1] if module_key in table else None
        if module_key in fused:
            problems.append(f"{module_key}: a fused layer of the original model ({fused[module_key].describe()}), "
                            "which cannot start the training of separate layers")
            continue
        if canonical not in ours:
            problems.append(f"{module_key}: in the file, but the config trains no such module"
                            + (" (not a module of this model)" if canonical is None else " (see preset/include/exclude)"))
            continue
        adapter = network.adapter(canonical)
        shape = tuple(adapter.base.weight.shape)
        algo, params, alpha = _module_params(source, module_key, group, shape, "the model's weight", torch.float32,
                                             load_report)
        expected = {n: tuple(t.shape) for n, t in adapter.tensors().items()}
        found = {n: tuple(t.shape) for n, t in params.items()}
        if algo.NAME != adapter.algo.NAME or expected != found:
            problems.append(f"{canonical}: the config makes {adapter.algo.NAME} {_shapes(expected)}, the file has "
                            f"{algo.NAME} {_shapes(found)}")
            continue
        rank = algo.rank(params)
        chosen[canonical] = (params, 1.0 if rank is None else alpha / rank)
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ConfigError(f"network.init_from: {source} does not fit the config in {len(problems)} module(s) "
                          "(the config's algo, factor, dim, full_matrix... decide each module's shapes):\n  "
                          + "\n  ".join(problems[:10]) + more)
    if not chosen:
        raise ConfigError(f"network.init_from: {source} has no module this config trains")
    with torch.no_grad():
        for key, (params, file_scale) in chosen.items():
            adapter = network.adapter(key)
            target = scalar_target(params.keys())
            for name, p in adapter.tensors().items():
                value = params[name] * (file_scale / adapter.scale) if name == target else params[name]
                p.copy_(value.to(p.device, p.dtype))
            if adapter.scalar is not None:
                adapter.scalar.fill_(1.0)
            report.loaded.append(key)
    report.fresh = [k for k in network.module_keys() if k not in chosen]
    if report.fresh:
        logger.warning("network.init_from: %d module(s) of the config are not in %s and start fresh (e.g. %s)",
                       len(report.fresh), source, ", ".join(report.fresh[:3]))
    return report


def _shapes(shapes: Mapping[str, tuple[int, ...]]) -> str:
    return "{" + ", ".join(f"{n} {s}" for n, s in sorted(shapes.items())) + "}"

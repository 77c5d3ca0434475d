"""PEFT LoKr <-> LyCORIS layout, by the rules each side applies (format spec, sections 1 and 6).

PEFT stores the same tensors under `base_model.model.<module path>.`, keeps r and alpha in
adapter_config.json (with per-module `rank_pattern` / `alpha_pattern`) and always scales by
alpha / r, even when both factors are full, where every SD tool applies 1. PEFT also builds
the tensor shapes itself from r, decompose_both and one decompose_factor whose split does not
swap, so a LyCORIS file converts only where those settings can reproduce its shapes; factors
whose stored form PEFT would not choose are expanded exactly to the full matrix.

This module is the one reader of the PEFT layout: `lokr_diffusion.loading` (load_adapter,
load_network) and the tools (inspect, convert, merge) all detect, group and translate PEFT
keys through the functions here.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from ..algos import lokr
from ..errors import AdapterFileError
from ..fileformat import read_header, read_safetensors, require_regular_file
from ..kron import factorization
from .adapterfile import FileModule, component_of, flat_shape, lokr_factor_shapes, module_problem

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_KEY = re.compile(r"(?:base_model\.model\.)?(.+)\.(lokr_\w+?)(?:\.(?!weight)\w+)?")
_PEFT_DEFAULTS = {"r": 8, "alpha": 8}  # LoKrConfig's defaults: scale 1


def split_peft_key(key: str) -> tuple[str, str] | None:
    """(module path, lokr tensor name) of a PEFT key, the optional prefix and adapter name dropped."""
    m = _KEY.fullmatch(key)
    return (m[1], m[2]) if m else None


def is_peft_layout(keys: Iterable[str]) -> bool:
    """PEFT's LoKr state dict (scaled by its config): only `<path>.lokr_*` keys, under the
    `base_model.model.` prefix or with no file-layout prefix.

    A file-layout file keyed by dotted module paths (`transformer.transformer_blocks.0.attn.to_q.lokr_w1`
    beside its `.alpha`, or LoHa/LoRA tensors) has other keys too, so it is not PEFT's; nor is an
    SD3 file that uses PEFT's prefix with the file layout's tensors, which ComfyUI reads as a file.
    """
    keys = list(keys)
    if any(k.startswith(PEFT_PREFIX) for k in keys):
        return all(split_peft_key(k) is not None for k in keys if k.startswith(PEFT_PREFIX))
    return bool(keys) and all(component_of(k) == "unknown" and split_peft_key(k) is not None for k in keys)


TE_PATHS = ("text_model.", "encoder.", "embeddings.", "final_layer_norm")  # text-encoder module paths


def is_peft_path(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / CONFIG_NAME).exists()


def looks_like_peft(path: str | Path) -> bool:
    """A PEFT folder, or a .safetensors file with PEFT keys (read from the header only)."""
    path = Path(path)
    if path.is_dir() and not is_peft_path(path):
        raise AdapterFileError(f"{path}: a folder must be a PEFT adapter ({CONFIG_NAME} + {WEIGHTS_NAME}); "
                               "give the path of a .safetensors file otherwise")
    return is_peft_path(path) or (path.is_file() and is_peft_layout(read_header(path)[0]))


def read_peft(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, list[str]]:
    """(tensors, adapter config, notes) of a PEFT folder or a bare PEFT `.safetensors` file.

    A bare file takes the adapter_config.json beside it; without one PEFT's defaults
    (alpha = r, scale 1) are assumed and said so in the notes.
    """
    path = Path(path)
    folder, weights = (path, path / WEIGHTS_NAME) if path.is_dir() else (path.parent, path)
    if path.is_dir() and not weights.exists():
        raise AdapterFileError(f"{path}: PEFT folder without {WEIGHTS_NAME}")
    tensors, _ = read_safetensors(weights)
    notes = []
    cfg_path = folder / CONFIG_NAME
    if cfg_path.exists() or path.is_dir():
        config = read_peft_config(cfg_path)
    else:
        config = dict(_PEFT_DEFAULTS)
        notes.append(f"no {CONFIG_NAME} beside {weights.name}: assumed PEFT's defaults r = alpha = 8 (scale 1)")
    return tensors, config, notes


def _number(cfg_path: Path, name: str, value: object, integer: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0 or (integer and value != int(value)):
        kind = "a positive integer" if integer else "a positive finite number"
        raise AdapterFileError(f"{cfg_path}: {name} is {value!r}; expected {kind}")
    return value


def read_peft_config(cfg_path: str | Path) -> dict:
    """adapter_config.json of a PEFT LoKr adapter, checked: a JSON object, peft_type LOKR, sane r / alpha.

    PEFT writes this file, but users edit it by hand; a wrong type would otherwise surface as
    an AttributeError deep in a conversion.
    """
    cfg_path = Path(cfg_path)
    require_regular_file(cfg_path, f"PEFT {CONFIG_NAME}")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise AdapterFileError(f"{cfg_path}: not valid JSON (not UTF-8 text: {exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise AdapterFileError(f"{cfg_path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise AdapterFileError(f"{cfg_path}: cannot read: {exc.strerror or exc}") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{cfg_path}: expected a JSON object (PEFT's adapter config), "
                               f"found a JSON {type(config).__name__.replace('dict', 'object')}")
    if str(config.get("peft_type", "LOKR")).upper() != "LOKR":
        raise AdapterFileError(f"{cfg_path}: peft_type is {config.get('peft_type')!r}; only LOKR is supported")
    for name, integer in (("r", True), ("alpha", False)):
        if name in config:
            _number(cfg_path, name, config[name], integer)
    for name, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        patterns = config.get(name)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise AdapterFileError(f"{cfg_path}: {name} is {patterns!r}; expected a JSON object of regex -> number")
        for pattern, value in patterns.items():
            _number(cfg_path, f"{name}[{pattern!r}]", value, integer)
            try:
                re.compile(pattern)
            except re.error as exc:
                raise AdapterFileError(f"{cfg_path}: {name} key {pattern!r} is not a regular expression ({exc})") from None
    return config


def group_peft(tensors: Mapping[str, torch.Tensor], source: str = "PEFT state dict") -> dict[str, dict[str, torch.Tensor]]:
    """module path -> {lokr tensor name: tensor}, every module checked to rebuild a LoKr update.

    The checks (missing w2_b, 0-dim or empty factors, dtypes, ranks) run here, before PEFT's
    scale is folded in, so a broken PEFT file fails with the module named instead of an
    IndexError in the translation.
    """
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        split = split_peft_key(key)
        if split is None:
            raise AdapterFileError(f"{source}: key {key!r} is not a PEFT LoKr tensor (<path>.lokr_...)")
        groups.setdefault(split[0], {})[split[1]] = t
    if not groups:
        raise AdapterFileError(f"{source}: no PEFT LoKr tensors (the state dict is empty)")
    for path, group in groups.items():
        unknown = sorted(set(group) - set(lokr.TENSOR_NAMES))
        if unknown:
            raise AdapterFileError(f"{source}: module {path}: unknown tensors {unknown} "
                                   f"(expected some of {list(lokr.TENSOR_NAMES)})")
        problem = module_problem(group, lokr) if lokr.detect(set(group)) else \
            f"tensors {sorted(group)} are no LoKr set (lokr_w1 / lokr_w2 or their _a/_b halves)"
        if problem is not None:
            raise AdapterFileError(f"{source}: module {path}: {problem}")
    return groups


def from_peft(state_dict: Mapping[str, torch.Tensor], alpha: float | None = None, rank: int | None = None,
              prefix: str = "lora_unet", source: str = "PEFT state dict") -> dict[str, torch.Tensor]:
    """A PEFT LoKr state dict (`base_model.model.<path>.lokr_w1[.<adapter>]`) in the file layout.

    PEFT scales by alpha / r (from its adapter_config.json) even when both factors are full,
    where the file layout applies scale 1; such modules get alpha / r folded into w1 here so
    the effective weight is unchanged. `prefix` names the component ("lora_unet", "lora_te"...).
    """
    out: dict[str, torch.Tensor] = {}
    for path, tensors in group_peft(state_dict, source).items():
        module = f"{prefix}_{path.replace('.', '_')}"
        decomposed = "lokr_w2_b" in tensors or "lokr_w1_b" in tensors
        r = int(tensors["lokr_w2_b" if "lokr_w2_b" in tensors else "lokr_w1_b"].shape[0]) if decomposed else (rank or 1)
        a = float(alpha if alpha is not None else r)
        if not decomposed:
            tensors = dict(tensors)
            w1 = "lokr_w1" if "lokr_w1" in tensors else "lokr_w1_a"
            tensors[w1] = tensors[w1] * (a / r)
            a = float(r)
        for name, t in tensors.items():
            out[f"{module}.{name}"] = t
        out[f"{module}.alpha"] = torch.tensor(a)
    return out


def pattern_value(patterns: Mapping[str, object] | None, path: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a regex matching the end of the module path."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return default


def module_rank_alpha(config: Mapping, path: str) -> tuple[int, float]:
    r = int(pattern_value(config.get("rank_pattern"), path, config.get("r", _PEFT_DEFAULTS["r"])))
    alpha = float(pattern_value(config.get("alpha_pattern"), path, config.get("alpha", _PEFT_DEFAULTS["alpha"])))
    return r, alpha


def peft_delta(tensors: Mapping[str, torch.Tensor], config: Mapping, path: str) -> torch.Tensor:
    """PEFT's effective update, flattened: dW * alpha / r with r from the config, always."""
    r, alpha = module_rank_alpha(config, path)
    t = {n: v.float() for n, v in tensors.items()}
    return lokr.delta_weight(t, flat_shape("lokr", t)) * (alpha / r)


def to_lycoris(groups: Mapping[str, Mapping[str, torch.Tensor]], config: Mapping,
               prefix_of: Callable[[str], str]) -> dict[str, torch.Tensor]:
    """File-layout tensors (diffusers-style keys) with the PEFT scale folded in per module."""
    out: dict[str, torch.Tensor] = {}
    for path, tensors in groups.items():
        r, alpha = module_rank_alpha(config, path)
        out.update(from_peft({f"{path}.{n}": t for n, t in tensors.items()}, alpha=alpha, rank=r,
                             prefix=prefix_of(path)))
    return out


def peft_split(dim: int, factor: int) -> tuple[int, int]:
    """PEFT's factorization: LyCORIS's, except that an exact divisor is never swapped."""
    if factor > 0 and dim % factor == 0:
        return factor, dim // factor
    return factorization(dim, factor)


def choose_factor(splits: list[tuple[int, int, int, int, int, int]], hint: int | None) -> int:
    """The one decompose_factor whose PEFT split gives every module's (a, b) and (c, d).

    `splits` holds (out, in, a, b, c, d) per module, in = input channels (kernel excluded).
    """
    candidates = ([hint] if hint else []) + [-1] + sorted({x for s in splits for x in s[2:]})
    for f in candidates:
        if all(peft_split(o, f) == (a, b) and peft_split(i, f) == (c, d) for o, i, a, b, c, d in splits):
            return f
    f = candidates[0]
    o, i, a, b, c, d = next(s for s in splits if (peft_split(s[0], f), peft_split(s[1], f)) != (s[2:4], s[4:6]))
    raise AdapterFileError(
        "PEFT cannot build these LoKr shapes: its LoKrConfig has one decompose_factor and splits an exact divisor "
        f"without swapping (e.g. a {o}x{i} weight stored as w1 {a}x{c}, w2 {b}x{d}, where factor {f} gives "
        f"w1 {peft_split(o, f)[0]}x{peft_split(i, f)[0]}); no factor reproduces every "
        "module. Convert with the LyCORIS layout instead, or retrain with a factor <= sqrt of the smallest width")


def _fits(r: int, w1_low: bool, w2_low: bool, a: int, b: int, c: int, d: int, decompose_both: bool) -> bool:
    """Whether PEFT, given rank r, would store the factors in exactly this form."""
    return w2_low == (r < max(b, d) / 2) and w1_low == (decompose_both and r < max(a, c) / 2)


def _full_rank(a: int, b: int, c: int, d: int, decompose_both: bool) -> int:
    """The smallest r for which PEFT keeps both factors full."""
    return max(math.ceil(max(b, d) / 2), math.ceil(max(a, c) / 2) if decompose_both else 1, 1)


def from_lycoris(modules: Mapping[str, FileModule], paths: Mapping[str, tuple[str, tuple[int, ...]]],
                 factor_hint: int | None = None) -> tuple[dict[str, torch.Tensor], dict, int]:
    """(PEFT tensors, adapter config, modules expanded to full) for LoKr modules in the plain form.

    `paths` maps a file key to (module path, conv kernel or ()). Each module keeps its LyCORIS
    scale s: PEFT gets r_m from the stored shapes and alpha_m = s * r_m via the patterns.
    """
    decompose_both = any("lokr_w1_a" in m.tensors for m in modules.values())
    splits, plans = [], {}
    expanded = 0
    for key, m in modules.items():
        if m.algo is not lokr:
            algo = m.algo.NAME if m.algo else "unknown"
            raise AdapterFileError(f"module {key} is {algo}; PEFT conversion handles LoKr only")
        path, kernel = paths[key]
        (a, c), (b, dk) = lokr_factor_shapes(m.tensors)
        k = math.prod(kernel)
        d = dk // k
        splits.append((a * b, c * d, a, b, c, d))
        t = dict(m.tensors)
        w1_low, w2_low = "lokr_w1_a" in t, "lokr_w2_a" in t
        r = m.rank
        if r is None or not _fits(r, w1_low, w2_low, a, b, c, d, decompose_both):
            if w1_low or w2_low:
                expanded += 1
            t = {"lokr_w1": lokr.make_w1(t), "lokr_w2": lokr.make_w2(t, b, d, kernel)}
            r = _full_rank(a, b, c, d, decompose_both)
        plans[key] = (path, t, r, m.scale * r)
    factor = choose_factor(splits, factor_hint)
    ranks = Counter(r for _, _, r, _ in plans.values())
    alphas = Counter(al for _, _, _, al in plans.values())
    r0, alpha0 = ranks.most_common(1)[0][0], alphas.most_common(1)[0][0]
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    for path, t, r, alpha in plans.values():
        for n, v in t.items():
            tensors[f"{PEFT_PREFIX}{path}.{n}"] = v.contiguous()
        if r != r0:
            rank_pattern[re.escape(path)] = r
        if alpha != alpha0:
            alpha_pattern[re.escape(path)] = alpha
    config = {
        "peft_type": "LOKR", "r": r0, "alpha": alpha0, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "target_modules": sorted(p for p, _, _, _ in plans.values()), "decompose_both": decompose_both,
        "decompose_factor": factor, "use_effective_conv2d": False, "rank_dropout": 0.0, "module_dropout": 0.0,
        "init_weights": True, "inference_mode": True, "task_type": None,
    }
    return tensors, config, expanded

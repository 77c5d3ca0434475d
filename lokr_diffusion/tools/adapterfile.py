"""An adapter file as data, read without a base model.

`inspect` and `convert` must work on a file alone, so everything here is derived from tensor
shapes: which algorithm a module uses, its scale, and its effective update. The update is
built as the flattened matrix (out, in*kh*kw): for LoKr kron(w1, w2 flattened) has exactly
the column order of the flattened conv weight, so the kernel size never has to be guessed.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType

import torch

from ..algos import ALGORITHMS, detect_algorithm
from ..dora import on_output_axis
from ..errors import AdapterFileError
from ..families import FAMILIES, FileFamily, family_of_adapter

# file-key prefix -> component, longest first so `lora_te1_` is not read as `lora_te_`
COMPONENT_PREFIXES = (("lora_unet_", "unet"), ("lycoris_", "unet"), ("lora_te1_", "te1"),
                      ("lora_te2_", "te2"), ("lora_te_", "te"))
_UNET_BLOCK = re.compile(r"(down_blocks_\d+|up_blocks_\d+|mid_block|input_blocks_\d+|middle_block|output_blocks_\d+)")
_DIT_BLOCK = re.compile(r"(?:^|[._])((?:single_)?transformer_blocks|double_blocks|single_blocks)[._](\d+)[._]")
# Tensor names a module key is followed by; the first part of a dotted one (`lora_up` of
# `lora_up.weight`, `lora_up.bias`) marks the split too
_TENSOR_NAMES = frozenset({n for a in ALGORITHMS.values() for n in a.TENSOR_NAMES}
                          | {"alpha", "dora_scale", "scale", "bias", "on_input"})
_TENSOR_HEADS = frozenset(n.split(".")[0] for n in _TENSOR_NAMES)


@dataclass
class FileModule:
    """One module of a file: the algorithm's tensors, its alpha, and anything else stored."""

    key: str
    tensors: dict[str, torch.Tensor]
    alpha: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    algo: ModuleType | None = None

    @property
    def component(self) -> str:
        return module_component(self.key)

    @property
    def rank(self) -> int | None:
        return self.algo.rank(self.tensors) if self.algo else None

    @property
    def scale(self) -> float:
        """alpha / r as every UI applies it; 1 with both LoKr factors full or without alpha."""
        r = self.rank
        if r is None or self.alpha is None:
            return 1.0
        return float(self.alpha.float()) / r

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def flat_shape(self) -> tuple[int, int]:
        """(out, in*kh*kw) of the weight this module patches, from its tensor shapes."""
        return flat_shape(self.algo.NAME, self.tensors)

    def kernel(self) -> tuple[int, ...] | None:
        return kernel_of(self.algo.NAME, self.tensors)

    def delta(self) -> torch.Tensor:
        """scale * dW in float32, flattened to (out, in*kh*kw)."""
        t = {n: v.float() for n, v in self.tensors.items()}
        return self.algo.delta_weight(t, self.flat_shape()) * self.scale


def component_of(key: str) -> str:
    """The component a key's prefix names ("unknown" without one: PEFT keys have none)."""
    for prefix, component in COMPONENT_PREFIXES:
        if key.startswith(prefix):
            return component
    return "unknown"


def module_component(key: str) -> str:
    """The component a file's module key patches: by prefix, then any family's denoiser layouts
    (Flux's `transformer.`, `diffusion_model.`, `lora_transformer_` and bare Diffusers paths)."""
    component = component_of(key)
    if component == "unknown" and any(f.denoiser_layout(key) for f in FAMILIES):
        return "unet"
    return component


def split_file_key(key: str) -> tuple[str, str]:
    """(module key, tensor name) of a file key whose module key may contain dots
    (`transformer.transformer_blocks.0.attn.to_q.lora_down.weight`).

    The tensor name is the longest tail that is a known tensor name or starts with one's first
    part (`lora_up.bias` stays one unknown tensor of its module); without one, the first dot
    splits, as in every underscore-keyed layout.
    """
    parts = key.split(".")
    for i in range(1, len(parts)):
        tail = ".".join(parts[i:])
        if tail in _TENSOR_NAMES or parts[i] in _TENSOR_HEADS:
            return ".".join(parts[:i]), tail
    module, _, tensor = key.partition(".")
    return module, tensor


def strip_prefix(key: str) -> str:
    for prefix, _ in COMPONENT_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def block_of(key: str) -> str:
    """The UNet block (down_blocks.1, input_blocks.4, ...) or text-encoder part a key belongs to."""
    rest = strip_prefix(key)
    if module_component(key) == "unet":
        m = _UNET_BLOCK.match(rest)
        if m:
            return m[1].replace("_blocks_", "_blocks.")
        dit = _DIT_BLOCK.search(rest)
        return f"{dit[1]}.{dit[2]}" if dit else "other"
    if "encoder_layers_" in rest:
        return "encoder.layers"
    return "encoder.block" if "encoder_block_" in rest else "other"  # T5


def group_modules(tensors: Mapping[str, torch.Tensor]) -> dict[str, FileModule]:
    """File-layout tensors (`<module key>.<tensor>`) per module, algorithm detected as the UIs do."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        module, name = split_file_key(key)
        groups.setdefault(module, {})[name] = t
    out = {}
    for key, group in groups.items():
        alpha = group.pop("alpha", None)
        algo = detect_algorithm(set(group))
        own = set(algo.TENSOR_NAMES) if algo else set()
        out[key] = FileModule(key, {n: t for n, t in group.items() if n in own}, alpha,
                              {n: t for n, t in group.items() if n not in own}, algo)
    return out


def _prod(xs) -> int:
    return math.prod(int(x) for x in xs)


def flat_shape(algo: str, t: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(out, in*kh*kw) from one module's tensors (shapes per the format spec, section 2)."""
    if algo == "lokr":
        a, c = (t["lokr_w1"].shape if "lokr_w1" in t else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1]))
        if "lokr_w2" in t:
            b, dk = t["lokr_w2"].shape[0], _prod(t["lokr_w2"].shape[1:])
        elif "lokr_t2" in t:  # Tucker: w2_a is (r, b), w2_b (r, d), the kernel sits in t2
            b, dk = t["lokr_w2_a"].shape[1], t["lokr_w2_b"].shape[1] * _prod(t["lokr_t2"].shape[2:])
        else:
            b, dk = t["lokr_w2_a"].shape[0], _prod(t["lokr_w2_b"].shape[1:])
        return int(a) * int(b), int(c) * int(dk)
    if algo == "loha":
        if "hada_t1" in t:
            return int(t["hada_w1_a"].shape[1]), int(t["hada_w1_b"].shape[1]) * _prod(t["hada_t1"].shape[2:])
        return int(t["hada_w1_a"].shape[0]), int(t["hada_w1_b"].shape[1])
    up, down, mid = t["lora_up.weight"], t["lora_down.weight"], t.get("lora_mid.weight")
    return int(up.shape[0]), _prod(down.shape[1:]) * (_prod(mid.shape[2:]) if mid is not None else 1)


def kernel_of(algo: str, t: Mapping[str, torch.Tensor]) -> tuple[int, ...] | None:
    """The conv kernel when the tensors state it, () for a linear layer, None when only the
    flattened size is stored (low-rank LoKr w2_b, LoHa)."""
    if algo == "lokr":
        for name, lo in (("lokr_w2", 2), ("lokr_t2", 2), ("lokr_w2_b", 2)):
            if name in t and t[name].dim() == 4:
                return tuple(int(k) for k in t[name].shape[lo:])
        return () if "lokr_w2" in t else None
    if algo == "loha":
        return tuple(int(k) for k in t["hada_t1"].shape[2:]) if "hada_t1" in t else None
    if "lora_mid.weight" in t:
        return tuple(int(k) for k in t["lora_mid.weight"].shape[2:])
    down = t["lora_down.weight"]
    return tuple(int(k) for k in down.shape[2:]) if down.dim() == 4 else ()


def lokr_factor_shapes(t: Mapping[str, torch.Tensor]) -> tuple[tuple[int, int], tuple[int, int]]:
    """((a, c), (b, d*kh*kw)): the Kronecker split a LoKr module uses."""
    out, in_k = flat_shape("lokr", t)
    a, c = (t["lokr_w1"].shape if "lokr_w1" in t else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1]))
    return (int(a), int(c)), (out // int(a), in_k // int(c))


# -- checking a file's modules before anything uses them --------------------------------------
#
# Files come from strangers: a reader that trusts the shapes crashes deep inside a tool (an
# IndexError on a 0-dim factor, a KeyError on a missing w2_b) instead of saying what is wrong.
# Every tool that reads an adapter without a model (inspect, convert, merge's early check) runs
# these first, so the same file gets the same one-line error everywhere.

FACTOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what the loaders apply
_FACTOR_DIMS = {
    "lokr_w1": (2,), "lokr_w1_a": (2,), "lokr_w1_b": (2,), "lokr_w2": (2, 4), "lokr_w2_a": (2,),
    "lokr_w2_b": (2, 4), "lokr_t2": (4,), "hada_w1_a": (2,), "hada_w1_b": (2,), "hada_w2_a": (2,),
    "hada_w2_b": (2,), "hada_t1": (4,), "hada_t2": (4,), "lora_up.weight": (2, 4), "lora_down.weight": (2, 4),
    "lora_mid.weight": (4,),
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _missing(names: set[str], algo: str) -> list[str]:
    """Tensors the algorithm needs to rebuild dW that the module lacks."""
    need: list[str] = []
    if algo == "lokr":
        if "lokr_w1" not in names:
            need += [n for n in ("lokr_w1_a", "lokr_w1_b") if n not in names] if names & {"lokr_w1_a", "lokr_w1_b"} \
                else ["lokr_w1 (or lokr_w1_a + lokr_w1_b)"]
        if "lokr_w2" not in names:
            need += [n for n in ("lokr_w2_a", "lokr_w2_b") if n not in names] if names & {"lokr_w2_a", "lokr_w2_b", "lokr_t2"} \
                else ["lokr_w2 (or lokr_w2_a + lokr_w2_b)"]
    elif algo == "loha":
        need += [n for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b") if n not in names]
        if ("hada_t1" in names) != ("hada_t2" in names):
            need.append("hada_t2" if "hada_t1" in names else "hada_t1")
    else:
        need += [n for n in ("lora_up.weight", "lora_down.weight") if n not in names]
    return need


def _rank_pairs(algo: str, t: Mapping[str, torch.Tensor]) -> list[tuple[str, int, str, int]]:
    """(tensor, dim, tensor, dim) pairs whose sizes are the same rank r and must agree."""
    if algo == "lokr":
        pairs = [("lokr_w1_a", 1, "lokr_w1_b", 0)]
        pairs += [("lokr_t2", 0, "lokr_w2_a", 0), ("lokr_t2", 1, "lokr_w2_b", 0)] if "lokr_t2" in t \
            else [("lokr_w2_a", 1, "lokr_w2_b", 0)]
    elif algo == "loha":
        pairs = []
        for i in (1, 2):
            pairs += [(f"hada_t{i}", 0, f"hada_w{i}_a", 0), (f"hada_t{i}", 1, f"hada_w{i}_b", 0)] if f"hada_t{i}" in t \
                else [(f"hada_w{i}_a", 1, f"hada_w{i}_b", 0)]
    else:
        pairs = [("lora_mid.weight", 0, "lora_up.weight", 1), ("lora_mid.weight", 1, "lora_down.weight", 0)] \
            if "lora_mid.weight" in t else [("lora_up.weight", 1, "lora_down.weight", 0)]
    return [p for p in pairs if p[0] in t and p[2] in t]


def module_problem(tensors: Mapping[str, torch.Tensor], algo: ModuleType) -> str | None:
    """What makes one module's factors unusable (None when they rebuild a weight).

    Checked in the order a user can act on: a missing tensor, a dtype no loader applies,
    the wrong number of dimensions or an empty one, ranks of paired factors that differ,
    and last factors that do not fit together at all.
    """
    names = set(tensors)
    missing = _missing(names, algo.NAME)
    if missing:
        return f"{algo.NAME} module is missing {', '.join(missing)} (it has {', '.join(sorted(names))})"
    for n, t in sorted(tensors.items()):
        if t.dtype not in FACTOR_DTYPES:
            return (f"tensor {n} has dtype {dtype_name(t.dtype)}; expected one of "
                    f"{', '.join(dtype_name(d) for d in FACTOR_DTYPES)}")
        dims = _FACTOR_DIMS.get(n, (2, 4))
        if t.dim() not in dims:
            return (f"tensor {n} has shape {tuple(t.shape)} ({t.dim()}-D); expected "
                    f"{' or '.join(f'{d}-D' for d in dims)}")
        if 0 in t.shape:
            return f"tensor {n} has shape {tuple(t.shape)}, with an empty dimension"
    for x, i, y, j in _rank_pairs(algo.NAME, tensors):
        if tensors[x].shape[i] != tensors[y].shape[j]:
            return (f"rank mismatch: {x} {tuple(tensors[x].shape)} and {y} {tuple(tensors[y].shape)} must share the "
                    f"rank (dim {i} of {x} = dim {j} of {y})")
    meta = {n: torch.empty(t.shape, device="meta") for n, t in tensors.items()}
    try:
        shape = flat_shape(algo.NAME, meta)
        if algo.NAME == "loha" and "hada_t1" not in meta:
            halves = [(meta[f"hada_w{i}_a"].shape[0], meta[f"hada_w{i}_b"].shape[1]) for i in (1, 2)]
            if halves[0] != halves[1]:
                raise ValueError(f"the two Hadamard halves are {halves[0]} and {halves[1]}")
        algo.delta_weight(meta, shape)
    except (RuntimeError, ValueError, IndexError, KeyError, ZeroDivisionError) as exc:
        found = ", ".join(f"{n} {tuple(t.shape)}" for n, t in sorted(tensors.items()))
        return f"tensors do not fit together ({found}; {exc})"
    return None


def magnitude_problem(magnitude: torch.Tensor, weight_shape: tuple[int, ...]) -> str | None:
    """What makes a DoRA `dora_scale` unusable for a weight of `weight_shape` (None when it fits):
    a float tensor of one finite magnitude per output row or per input column."""
    if magnitude.dtype not in FACTOR_DTYPES:
        return f"dora_scale has dtype {dtype_name(magnitude.dtype)}; expected a float type"
    try:
        on_output_axis(tuple(magnitude.shape), tuple(weight_shape))
    except ValueError as exc:
        return str(exc)
    if not torch.isfinite(magnitude.float()).all():
        return "dora_scale has non-finite values (NaN or inf)"
    return None


def flat_magnitude_problem(magnitude: torch.Tensor, flat: tuple[int, int]) -> str | None:
    """`magnitude_problem` for a module known only by its flattened shape (out, in*kh*kw), as in a
    file read without its model: one magnitude per output row, or per input channel of a size
    that divides in*kh*kw."""
    shape = tuple(magnitude.shape)
    out, in_k = flat
    fits = len(shape) >= 2 and all(s == 1 for s in shape[2:]) and (
        (shape[0] == out and shape[1] == 1) or (shape[0] == 1 and shape[1] >= 1 and in_k % shape[1] == 0))
    if not fits:
        return (f"dora_scale has shape {shape}; expected one magnitude per output row ({out}, 1[, 1, 1]) "
                "or per input channel (1, in[, 1, 1])")
    if magnitude.dtype not in FACTOR_DTYPES:
        return f"dora_scale has dtype {dtype_name(magnitude.dtype)}; expected a float type"
    if not torch.isfinite(magnitude.float()).all():
        return "dora_scale has non-finite values (NaN or inf)"
    return None


def alpha_problem(alpha: torch.Tensor) -> str | None:
    """What is wrong with a stored alpha (None when it is one number)."""
    if alpha.numel() != 1:
        return f"alpha has shape {tuple(alpha.shape)}; expected a scalar"
    if alpha.dtype == torch.bool or alpha.is_complex():
        return f"alpha has dtype {dtype_name(alpha.dtype)}; expected a float"
    return None


def non_finite(m: FileModule) -> list[str]:
    """Names of the module's tensors (alpha included) holding NaN or inf."""
    bad = [n for n, t in sorted(m.tensors.items()) if t.is_floating_point() and not torch.isfinite(t.float()).all()]
    if m.alpha is not None and m.alpha.numel() and not torch.isfinite(m.alpha.float()).all():
        bad.append("alpha")
    return bad


NON_FINITE = "non-finite values (NaN or inf)"

# (what a key starts with, what such weights are), first match wins: for telling a user
# which file they gave when it is not an adapter
_WEIGHT_KINDS = (
    (("model.diffusion_model.",), "a single-file Stable Diffusion checkpoint"),
    (("double_blocks.", "single_blocks.", "joint_blocks."), "a diffusion transformer in the original layout"),
    (("transformer_blocks.", "single_transformer_blocks."), "Diffusers transformer weights"),
    (("down_blocks.", "conv_in.", "time_embedding."), "Diffusers UNet weights"),
    (("encoder.down_blocks.", "decoder.up_blocks.", "decoder.conv_in.", "quant_conv."), "VAE weights"),
    (("text_model.", "embeddings.token_embedding.", "encoder.layers."), "CLIP text-encoder weights"),
    (("encoder.block.", "shared.weight"), "T5 text-encoder weights"),
)


def weights_kind(keys: list[str]) -> str | None:
    """What a set of tensor names looks like (a UNet, a VAE, a checkpoint...), or None."""
    for marks, kind in _WEIGHT_KINDS:
        if any(k.startswith(m) for k in keys for m in marks):
            return kind
    return None


def check_modules(modules: Mapping[str, FileModule], source: str, finite: bool = True) -> dict[str, list[str]]:
    """Raise an AdapterFileError naming `source`, the module and the tensor for the first unusable module.

    A file without any LoKr/LoHa/LoRA module is refused as not an adapter. With `finite`,
    NaN/inf values are refused too; without, they are returned (module key -> tensor names)
    so `inspect` can report every affected module.
    """
    for m in modules.values():  # half an algorithm's set: every loader skips it, silently
        partial = [a for a in ALGORITHMS.values() if m.algo is None and set(m.extras) & set(a.TENSOR_NAMES)]
        if partial:
            names = set(m.extras) & set(partial[0].TENSOR_NAMES)
            raise AdapterFileError(f"{source}: module {m.key}: {partial[0].NAME} module is missing "
                                   f"{', '.join(_missing(names, partial[0].NAME))} (it has {', '.join(sorted(names))})")
    adapters = [m for m in modules.values() if m.algo is not None]
    if not adapters:
        keys = sorted(f"{k}.{n}".rstrip(".") for k, m in modules.items() for n in m.extras)
        kind = weights_kind(keys)
        found = (f"it holds {len(keys)} tensor(s)" + (f" that look like {kind} (a base model or a part of one), not an adapter" if kind else "")
                 + f" ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})") if keys else "it has no tensors"
        raise AdapterFileError(f"{source}: not an adapter file: {found}; expected the tensors of LoKr (lokr_w1...), "
                               "LoHa (hada_w1_a...) or LoRA (lora_down.weight...) modules, or a PEFT adapter folder")
    bad: dict[str, list[str]] = {}
    for m in adapters:
        problem = module_problem(m.tensors, m.algo)
        if problem is None and m.alpha is not None:
            problem = alpha_problem(m.alpha)
        if problem is None and "dora_scale" in m.extras:
            problem = flat_magnitude_problem(m.extras["dora_scale"], m.flat_shape())
        if problem is not None:
            raise AdapterFileError(f"{source}: module {m.key}: {problem}")
        names = non_finite(m)
        if names:
            if finite:
                raise AdapterFileError(f"{source}: module {m.key}: tensor {names[0]} has {NON_FINITE}; no loader "
                                       "should apply it, fix or retrain the adapter")
            bad[m.key] = names
    return bad


def detect_family(modules: Mapping[str, FileModule], metadata: Mapping[str, str]) -> FileFamily:
    """What the file says about its base model: one family, several sharing its keys, or none,
    and how that was decided (see `families.family_of_adapter`)."""
    return family_of_adapter([(m.component, m.key, m.flat_shape() if m.algo is not None else ())
                              for m in modules.values()], metadata)


def network_args(metadata: Mapping[str, str]) -> dict:
    """`ss_network_args` decoded (sd-scripts stores a JSON object of strings); {} when absent or broken."""
    try:
        args = json.loads(metadata.get("ss_network_args", "{}"))
    except json.JSONDecodeError:
        return {}
    return args if isinstance(args, dict) else {}


def as_number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def max_abs_and_relative(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """max |a - b| and ||a - b|| / ||a|| (0 when both are zero)."""
    diff = (a - b).float()
    norm = float(a.float().norm())
    err = float(diff.norm())
    return float(diff.abs().max()) if diff.numel() else 0.0, (err / norm if norm > 0 else err)

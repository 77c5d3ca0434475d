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

from ..algos import detect_algorithm
from ..families import family_of_adapter

# file-key prefix -> component, longest first so `lora_te1_` is not read as `lora_te_`
COMPONENT_PREFIXES = (("lora_unet_", "unet"), ("lycoris_", "unet"), ("lora_te1_", "te1"),
                      ("lora_te2_", "te2"), ("lora_te_", "te"))
_UNET_BLOCK = re.compile(r"(down_blocks_\d+|up_blocks_\d+|mid_block|input_blocks_\d+|middle_block|output_blocks_\d+)")


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
        return component_of(self.key)

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
    for prefix, component in COMPONENT_PREFIXES:
        if key.startswith(prefix):
            return component
    return "unknown"


def strip_prefix(key: str) -> str:
    for prefix, _ in COMPONENT_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def block_of(key: str) -> str:
    """The UNet block (down_blocks.1, input_blocks.4, ...) or text-encoder part a key belongs to."""
    rest = strip_prefix(key)
    if component_of(key) == "unet":
        m = _UNET_BLOCK.match(rest)
        return m[1].replace("_blocks_", "_blocks.") if m else "other"
    return "encoder.layers" if "encoder_layers_" in rest else "other"


def group_modules(tensors: Mapping[str, torch.Tensor]) -> dict[str, FileModule]:
    """File-layout tensors (`<module key>.<tensor>`) per module, algorithm detected as the UIs do."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        module, _, name = key.partition(".")
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


def detect_family(modules: Mapping[str, FileModule], metadata: Mapping[str, str]) -> tuple[str | None, str]:
    """(family name, how it was decided): 'sd1', 'sd2', 'sdxl', 'sd' (SD1 or SD2) or None."""
    found = family_of_adapter([(m.component, m.key, m.flat_shape() if m.algo is not None else ())
                               for m in modules.values()], metadata)
    if found.family is not None:
        return found.family.name, found.how
    return ("sd" if found.candidates else None), found.how


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

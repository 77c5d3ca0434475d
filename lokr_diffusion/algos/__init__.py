"""The adapter algorithms, one small module each with the same shape.

Every algorithm module provides:
  NAME              its name in configs and metadata ("lokr", "loha", "lora")
  TENSOR_NAMES      the per-module tensor names it reads from a file
  detect(names)     whether a module's tensor names belong to it (as the UIs decide)
  init_tensors(weight_shape, settings)  freshly initialised tensors; the update starts at 0
  delta_weight(tensors, weight_shape)   the unscaled dW, shaped like the base weight
  rank(tensors)     the r of scale = alpha / r, or None when the scale is 1
  forward(x, tensors, base)             the unscaled delta output for input x, or None
                                        where rebuilding dW is the only way
Adding a method means adding one module here and listing it in ALGORITHMS.
"""
from __future__ import annotations

from types import ModuleType

from . import loha, lokr, lora
from .common import ModuleSettings

ALGORITHMS: dict[str, ModuleType] = {m.NAME: m for m in (lokr, loha, lora)}


def get_algorithm(name: str) -> ModuleType:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown adapter algorithm {name!r}; expected one of {sorted(ALGORITHMS)}") from None


def detect_algorithm(tensor_names: set[str]) -> ModuleType | None:
    """The algorithm a module's tensors belong to, LoKr first as the UIs check it."""
    for algo in ALGORITHMS.values():
        if algo.detect(tensor_names):
            return algo
    return None


__all__ = ["ALGORITHMS", "ModuleSettings", "detect_algorithm", "get_algorithm", "lokr", "loha", "lora"]

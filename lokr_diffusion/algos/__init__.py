"""The adapter algorithms, one small module each, all providing the `Algorithm` protocol.

The protocol (algos/common.py) lists and explains every member:
  NAME, TENSOR_NAMES, detect(names), init_tensors(weight_shape, settings),
  delta_weight(tensors, weight_shape), rank(tensors), forward(x, tensors, base, scale=None).
Adding a method means adding one module here that provides all of them and listing it in
ALGORITHMS (tests/test_layers.py checks every listed module against the protocol).
"""
from __future__ import annotations

from . import loha, lokr, lora
from .common import Algorithm, ModuleSettings, scalar_target

ALGORITHMS: dict[str, Algorithm] = {m.NAME: m for m in (lokr, loha, lora)}


def get_algorithm(name: str) -> Algorithm:
    """The algorithm called `name` in configs; a ValueError naming the known ones otherwise."""
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown adapter algorithm {name!r}; expected one of {sorted(ALGORITHMS)}") from None


def detect_algorithm(tensor_names: set[str]) -> Algorithm | None:
    """The algorithm a module's tensors belong to, LoKr first as the UIs check it."""
    for algo in ALGORITHMS.values():
        if algo.detect(tensor_names):
            return algo
    return None


__all__ = ["ALGORITHMS", "Algorithm", "ModuleSettings", "detect_algorithm", "get_algorithm", "lokr", "loha", "lora",
           "scalar_target"]

"""Names of floating-point types, in one table for configs, the CLI and the loaders.

Users write ``fp16``, ``float16`` or ``half`` interchangeably, and ``mixed_precision = "no"``
means full precision; every place that turns such a word into a torch dtype reads this table,
so a spelling accepted in one place is accepted everywhere.
"""
from __future__ import annotations

import torch

from typing import Any, Callable

from .errors import ConfigError

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32, "no": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}
SHORT_NAMES: dict[torch.dtype, str] = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
SAFETENSORS_NAMES: dict[torch.dtype, str] = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def parse_dtype(name: str | torch.dtype | None, what: str = "dtype") -> torch.dtype | None:
    """A dtype word (or a torch.dtype, or None meaning "keep") -> torch dtype; ``what`` names the
    setting in the error."""
    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).strip().lower()
    if key not in DTYPES:
        raise ConfigError(f"unknown {what} {name!r}; expected one of fp16, bf16, fp32 "
                          f"(also accepted: {', '.join(k for k in DTYPES if k not in ('fp16', 'bf16', 'fp32'))})")
    return DTYPES[key]


def canonical_dtype_name(word: str, full_precision: str = "fp32") -> str:
    """The short spelling (fp32, fp16, bf16) of a dtype word in any accepted spelling (torch's
    `float32`, `bfloat16`, `half`, any case); `full_precision` is how the caller spells float32
    (`mixed_precision` says "no"). Other words come back unchanged, for the caller's choices to
    refuse or accept (`auto`, `fp8`)."""
    key = word.strip().lower()
    if key == "no" and full_precision != "no":
        return word
    dtype = DTYPES.get(key)
    if dtype is None:
        return word
    return full_precision if dtype is torch.float32 else SHORT_NAMES[dtype]


def dtype_setting(full_precision: str = "fp32") -> Callable[[Any, Any, str], str]:
    """`parse` for a config key naming a dtype (see lokr_diffusion.schema.setting): the value is
    stored in its short spelling, so the rest of the code compares one word, the saved config.json
    shows it, and the key's `choices` check sees it."""
    from .schema import toml_type

    def parse(value: Any, scope: Any, key: str) -> str:
        if not isinstance(value, str):
            raise scope.fail(key, f"expected a string, got {value!r} ({toml_type(value)})")
        return canonical_dtype_name(value, full_precision)

    return parse


TORCH_ALIASES_DOC = "(or torch's names: `float32`, `float16`, `bfloat16`)"

"""Names of floating-point types, in one table for configs, the CLI and the loaders.

Users write ``fp16``, ``float16`` or ``half`` interchangeably, and ``mixed_precision = "no"``
means full precision; every place that turns such a word into a torch dtype reads this table,
so a spelling accepted in one place is accepted everywhere.
"""
from __future__ import annotations

import torch

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

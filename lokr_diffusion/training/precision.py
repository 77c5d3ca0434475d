"""Which mixed precision a run uses when the config and Accelerate may both have a say.

`accelerate launch` passes its choice (from `accelerate config` or `--mixed_precision`) to the
process as ACCELERATE_MIXED_PRECISION; a value given to `Accelerator(...)` in code silently
wins over it. The rule here, documented with `train.mixed_precision`:

* the key unset: Accelerate's choice (`no` when not launched through `accelerate launch`);
* the key set: the config's value, because the config is the run's recipe, saved with it and
  checked when the run resumes; when Accelerate asked for something else, the run says so at
  the start, naming both and how to let Accelerate decide. Accelerate's `no` is not "something
  else": `accelerate launch` sets it whenever nothing was configured, so it cannot be told
  from a deliberate choice.
"""
from __future__ import annotations

import os
from typing import Mapping

from ..errors import ConfigError

ACCELERATE_ENV = "ACCELERATE_MIXED_PRECISION"
SUPPORTED = ("no", "fp16", "bf16")

__all__ = ["ACCELERATE_ENV", "SUPPORTED", "resolve_mixed_precision"]


def resolve_mixed_precision(configured: str | None,
                            environ: Mapping[str, str] = os.environ) -> tuple[str, str | None]:
    """(the precision to run with, a notice for the user or None) by the rule above."""
    from ..dtypes import canonical_dtype_name

    raw = (environ.get(ACCELERATE_ENV) or "").strip()
    launcher = canonical_dtype_name(raw, full_precision="no").lower() if raw else None
    if configured is None:
        if launcher is None:
            return "no", None
        if launcher not in SUPPORTED:
            raise ConfigError(f"Accelerate is configured with mixed precision {raw!r} ({ACCELERATE_ENV}, from "
                              f"accelerate config or accelerate launch --mixed_precision); this trainer runs "
                              f"{', '.join(SUPPORTED)}: set train.mixed_precision or change the Accelerate setting")
        return launcher, None
    if launcher is not None and launcher not in ("no", configured):
        return configured, (f"mixed precision: train.mixed_precision = {configured!r} from the config is used; "
                            f"Accelerate asked for {raw!r} (accelerate config or accelerate launch "
                            f"--mixed_precision). Remove train.mixed_precision from the config to let Accelerate "
                            f"decide")
    return configured, None

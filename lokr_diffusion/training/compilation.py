"""`[train] compile`: the denoiser compiled in place, adapters attached.

One function, used by the trainer and by bench/bench_compile.py, so the benchmark measures what
training runs.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["compile_in_place"]


def compile_in_place(model: nn.Module, backend: str = "inductor", mode: str = "default") -> dict[str, Any]:
    """`model.compile(...)` (the module, its state dict and any pipeline holding it stay as they
    are; only its calls run compiled). Returns the arguments used.

    On a CPU, inductor's layout optimisation is switched off. It moves the convolutions to
    channels-last and adds the conversions around them. On the SD1.5-shaped UNet of
    bench/bench_speed.py (1 thread) it made the compiled step slower than eager: the frozen base
    3.25 s against 2.55 s without it, and with LoKr attached 4.14 s against 2.71 s, the
    convolution backward alone 2.2x. `mode` and `options` cannot both be given to
    torch.compile, so the mode is passed as the options it stands for.
    """
    args: dict[str, Any] = {"backend": backend}
    if backend == "inductor":
        param = next(model.parameters(), None)
        if param is not None and param.device.type == "cpu":
            args["options"] = {**torch._inductor.list_mode_options(mode), "layout_optimization": False}
        else:
            args["mode"] = mode
    model.compile(**args)
    return args

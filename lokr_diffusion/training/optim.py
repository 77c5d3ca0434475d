"""Optimizers by name, with the user's constructor arguments; the optional ones say how to install
themselves when missing. Learning-rate schedules with their arguments."""
from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import ConfigError

# Constructor arguments the trainer sets from other keys: optimizer_args may not repeat them.
RESERVED_ARGS = {
    "params": "the trainer passes the adapter parameters",
    "lr": "set train.learning_rate (unet_lr, text_encoder_lr)",
    "weight_decay": "set train.weight_decay (unet_weight_decay, text_encoder_weight_decay)",
}
# What the trainer passes besides the user's arguments, per optimizer (Adafactor: a fixed step size)
_FIXED_ARGS: dict[str, dict[str, Any]] = {
    "adafactor": {"scale_parameter": False, "relative_step": False, "warmup_init": False},
}


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The class `[train] optimizer` names; a missing optional package is a ConfigError."""
    if name == "adamw":
        return torch.optim.AdamW
    if name == "sgd":
        return torch.optim.SGD
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("train.optimizer = 'adamw8bit' needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise ConfigError("train.optimizer = 'prodigy' needs prodigyopt: pip install prodigyopt "
                              "(and set learning_rate = 1.0, as Prodigy finds the step size itself)") from None
        return Prodigy
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor
    raise ConfigError(f"train.optimizer: unknown optimizer {name!r}")


def accepted_args(cls: type) -> list[str]:
    """The keyword arguments `cls`'s constructor takes that optimizer_args may set."""
    params = inspect.signature(cls.__init__).parameters.values()
    return [p.name for p in params if p.name != "self" and p.name not in RESERVED_ARGS
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def check_optimizer_args(name: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """`[train] optimizer_args` checked against the optimizer's constructor signature: a key it
    does not take is refused with the keys it does, before any model loads. Arrays become
    tuples (``betas = [0.9, 0.99]``)."""
    if not args:
        return {}
    cls = optimizer_class(name)
    accepted = accepted_args(cls)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values())
    out = {}
    for key, value in args.items():
        if key in RESERVED_ARGS:
            raise ConfigError(f"train.optimizer_args.{key}: not allowed here: {RESERVED_ARGS[key]}")
        if key not in accepted and not takes_any:
            close = difflib.get_close_matches(key, accepted, n=1)
            raise ConfigError(f"train.optimizer_args.{key}: {cls.__name__} ({name}) takes no such argument"
                              + (f" (did you mean {close[0]!r}?)" if close else "")
                              + f"; it accepts: {', '.join(accepted)}")
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


def build_optimizer(name: str, param_groups: list[dict], lr: float, weight_decay: float,
                    args: Mapping[str, Any] | None = None) -> torch.optim.Optimizer:
    """The optimizer over `param_groups` (a group's own "lr" / "weight_decay" win over the
    defaults); `args` are `[train] optimizer_args`, which win over the trainer's fixed choices
    (Adafactor's fixed step size). A value the constructor refuses is a ConfigError naming it."""
    cls = optimizer_class(name)
    kwargs = {**_FIXED_ARGS.get(name, {}), **check_optimizer_args(name, args or {})}
    try:
        return cls(param_groups, lr=lr, weight_decay=weight_decay, **kwargs)
    except (ValueError, TypeError) as exc:
        if not args:
            raise
        shown = ", ".join(f"{k} = {v!r}" for k, v in (args or {}).items())
        raise ConfigError(f"train.optimizer_args: {cls.__name__} refused {shown}: {exc}") from None


def build_lr_scheduler(name: str, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                       num_cycles: int = 1, power: float = 1.0):
    """Diffusers' schedule `name`; `num_cycles` reaches cosine_with_restarts (the rate falls along
    a cosine num_cycles times, jumping back to its peak in between) and `power` reaches
    polynomial (1: linear)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps,
                         num_cycles=num_cycles, power=power)

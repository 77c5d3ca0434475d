"""AdapterModule: one adapter attached to one nn.Linear / nn.Conv2d of a frozen model.

The adapter does not replace the layer: it adds a forward hook that returns
base(x) + multiplier * scale * delta(x). The model's own module tree and state dict stay
untouched, several adapters stack on one layer, and removing the hook restores the layer.
"""
from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from .algos.common import apply_weight


class _Holder(nn.Module):
    """Gives a dotted tensor name its own level ('lora_down.weight'), so the native state dict
    of an adapter network is exactly the file layout."""


class AdapterModule(nn.Module):
    """The trainable (or loaded) tensors of one layer plus the rules to apply them."""

    def __init__(self, key: str, base: nn.Module, algo: ModuleType, tensors: dict[str, torch.Tensor],
                 alpha: float, multiplier: float = 1.0, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"{key}: adapters wrap nn.Linear or nn.Conv2d, got {type(base).__name__}")
        self.key = key
        self.algo = algo
        self._base = (base,)  # a tuple keeps the frozen layer out of this module's parameters
        self.tensor_names = tuple(tensors)
        for name, t in tensors.items():
            owner, leaf = self, name
            if "." in name:
                head, leaf = name.split(".", 1)
                if not hasattr(self, head):
                    self.add_module(head, _Holder())
                owner = getattr(self, head)
            owner.register_parameter(leaf, nn.Parameter(t))
        self.register_buffer("alpha", torch.tensor(float(alpha), dtype=torch.float32))
        self.multiplier = float(multiplier)
        self.rank_dropout = float(rank_dropout)
        self.module_dropout = float(module_dropout)
        self.enabled = True
        self.merged = False
        self._hook: torch.utils.hooks.RemovableHandle | None = None

    @property
    def base(self) -> nn.Module:
        return self._base[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Tensors under their file names (e.g. 'lokr_w1', 'lora_down.weight')."""
        return {n: self.get_parameter(n) for n in self.tensor_names}

    @property
    def scale(self) -> float:
        r = self.algo.rank(self.tensors())
        return 1.0 if r is None else float(self.alpha) / r

    def delta_weight(self) -> torch.Tensor:
        """multiplier-free scaled dW in the adapter's dtype, shaped like the base weight."""
        return self.algo.delta_weight(self.tensors(), tuple(self.base.weight.shape)) * self.scale

    # -- forward -----------------------------------------------------------------------------
    def attach(self) -> None:
        if self._hook is None:
            self._hook = self.base.register_forward_hook(self._hook_fn)

    def detach(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _hook_fn(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.merged or self.multiplier == 0.0:
            return output
        if self.training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return output
        return output + self.delta(args[0]).to(output.dtype)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """multiplier * scale * dW applied to x: the factored path where the algorithm has one."""
        t = self.tensors()
        dtype = next(iter(t.values())).dtype
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(dtype)  # adapter math in the adapter's dtype (fp32), cast back by the caller
        y = self.algo.forward(x, t, self.base)
        if y is None:
            w = self.algo.delta_weight(t, tuple(self.base.weight.shape))
            y = apply_weight(x, w.to(x.dtype), self.base)
        y = y * (self.multiplier * self.scale)
        if self.training and self.rank_dropout:
            keep = (torch.rand(y.shape[1] if y.dim() == 4 else y.shape[-1], device=y.device) > self.rank_dropout)
            keep = keep.to(y.dtype) / (1.0 - self.rank_dropout)
            y = y * (keep.view(1, -1, 1, 1) if y.dim() == 4 else keep)
        return y

    # -- merge ---------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, multiplier: float | None = None) -> None:
        """Add multiplier * scale * dW into the base weight (fp32 math, cast to its dtype)."""
        if self.merged:
            return
        m = self.multiplier if multiplier is None else float(multiplier)
        w = self.base.weight
        w.copy_((w.float() + m * self.delta_weight().float().to(w.device)).to(w.dtype))
        self._merged_multiplier = m
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.base.weight
        w.copy_((w.float() - self._merged_multiplier * self.delta_weight().float().to(w.device)).to(w.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        shapes = ", ".join(f"{n}={tuple(p.shape)}" for n, p in self.tensors().items())
        return f"{self.key}: {self.algo.NAME}, scale={self.scale:g}, {shapes}"

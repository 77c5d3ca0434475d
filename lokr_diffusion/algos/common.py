"""What every algorithm provides (the `Algorithm` protocol) and the helpers they share."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn


@runtime_checkable
class Algorithm(Protocol):
    """The interface of an adapter algorithm; each is a module (algos/lokr.py, ...) providing all of it.

    Callers (layers, network, loading, tools) only ever use these members, so a new method is
    one module that provides every one of them, listed in `algos.ALGORITHMS`. There are no
    optional members: what an algorithm cannot do is stated by its return values (`rank` None,
    `forward` None).
    """

    NAME: str
    """Its name in configs and in file metadata ("lokr", "loha", "lora")."""

    TENSOR_NAMES: tuple[str, ...]
    """Every per-module tensor name it reads from a file: loading rejects any other name."""

    def detect(self, names: set[str]) -> bool:
        """Whether one module's tensor names belong to this algorithm, decided as the UIs decide,
        so files from other tools load as the same method."""
        ...

    def init_tensors(self, weight_shape: tuple[int, ...], settings: ModuleSettings) -> dict[str, torch.Tensor]:
        """Freshly initialised tensors for a base weight of `weight_shape` (file names as keys):
        training starts from them, and the update they give is exactly 0."""
        ...

    def delta_weight(self, tensors: dict[str, torch.Tensor], weight_shape: tuple[int, ...]) -> torch.Tensor:
        """The unscaled dW shaped like the base weight: what merging, fusing, inference and the
        fallback of `forward` use."""
        ...

    def rank(self, tensors: dict[str, torch.Tensor]) -> int | None:
        """The r in scale = alpha / r, or None when the scale is 1 (as in the other tools)."""
        ...

    def forward(self, x: torch.Tensor, tensors: dict[str, torch.Tensor], base: nn.Module,
                scale: float | torch.Tensor | None = None,
                fold: bool = False) -> torch.Tensor | FoldedUpdate | None:
        """The delta output for input `x` of layer `base` without building dW (cheaper in
        training), times `scale` when given (unscaled when None); None where rebuilding dW is
        the only or the cheaper way, and the caller then applies `delta_weight`. `fold` says
        that the caller adds a rebuilt dW to the layer's own weight (one full-size product in
        training instead of three), for algorithms that weigh the two ways; with it, a
        FoldedUpdate is also an answer."""
        ...


class FoldedUpdate:
    """A training update that goes into the layer's weight for one call, detached, while the
    factors get their gradients from the activations: the layer's own products then carry the
    update's output and the input gradient, and no full-size weight gradient is formed.

    `weight`: the scaled dW, shaped like the layer's weight. `gradients(y, keep=None)`: the
    layer's output y, unchanged, with the factors' gradients attached (times `keep`, module
    dropout's 0/1 draw, which the caller also applies to `weight`).
    """

    __slots__ = ("weight", "gradients")

    def __init__(self, weight: torch.Tensor, gradients: Callable[..., torch.Tensor]) -> None:
        self.weight, self.gradients = weight, gradients


def apply_weight(x: torch.Tensor, weight: torch.Tensor, base: nn.Module) -> torch.Tensor:
    """Run `x` through a weight of the base layer's kind (no bias), with its conv geometry."""
    if isinstance(base, nn.Conv2d):
        return F.conv2d(x, weight, None, base.stride, base.padding, base.dilation, base.groups)
    return F.linear(x, weight)


def kaiming_(t: torch.Tensor) -> torch.Tensor:
    """Kaiming-uniform with a = sqrt(5): nn.Linear's default, which LyCORIS uses for its factors."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


def weight_dims(weight_shape: tuple[int, ...]) -> tuple[int, int, tuple[int, ...]]:
    """(out, in, kernel) of a Linear (out, in) or Conv2d (out, in, kh, kw) weight shape."""
    out_dim, in_dim = int(weight_shape[0]), int(weight_shape[1])
    return out_dim, in_dim, tuple(int(k) for k in weight_shape[2:])


class ModuleSettings:
    """The settings one wrapped layer is built from (linear or conv values already chosen).

    `use_scalar` (LyCORIS `use_scalar`): the second factor starts Kaiming/normal instead of
    zero, the update being held at 0 by a learnable scalar that starts at 0 (AdapterModule).
    `unbalanced` (LyCORIS `unbalanced_factorization`): LoKr puts the larger output factor on w1.
    `use_tucker` (LyCORIS `use_tucker`): k x k convs with a low-rank factor get a Tucker core.
    """

    __slots__ = ("dim", "alpha", "factor", "full_matrix", "decompose_both", "use_scalar", "unbalanced", "use_tucker")

    def __init__(self, dim: int, alpha: float, factor: int = -1, full_matrix: bool = False,
                 decompose_both: bool = False, use_scalar: bool = False, unbalanced: bool = False,
                 use_tucker: bool = False) -> None:
        self.dim, self.alpha, self.factor = int(dim), float(alpha), int(factor)
        self.full_matrix, self.decompose_both = bool(full_matrix), bool(decompose_both)
        self.use_scalar, self.unbalanced = bool(use_scalar), bool(unbalanced)
        self.use_tucker = bool(use_tucker)

    def __repr__(self) -> str:
        return (f"ModuleSettings(dim={self.dim}, alpha={self.alpha}, factor={self.factor}, "
                f"full_matrix={self.full_matrix}, decompose_both={self.decompose_both}, "
                f"use_scalar={self.use_scalar}, unbalanced={self.unbalanced}, use_tucker={self.use_tucker})")


def scalar_target(names: "set[str] | tuple[str, ...]") -> str:
    """The factor a `use_scalar` scalar is folded into when a file is written, as LyCORIS folds
    it (and the one `init_from` rescales): LoKr's w1 (or w1_a), LoHa's w1_a, LoRA's up."""
    for name in ("lokr_w1", "lokr_w1_a", "hada_w1_a", "lora_up.weight"):
        if name in names:
            return name
    raise ValueError(f"no factor to fold a scalar into among {sorted(names)}")


def tucker_applies(settings: ModuleSettings, kernel: tuple[int, ...]) -> bool:
    """Whether a layer gets a Tucker core: `use_tucker` on a conv whose kernel is more than 1x1
    (LyCORIS's rule; each algorithm adds its own condition on the rank)."""
    return settings.use_tucker and any(k != 1 for k in kernel)

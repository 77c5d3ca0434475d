"""AdapterModule: one adapter attached to one nn.Linear / nn.Conv2d of a frozen model.

The adapter does not replace the layer: a small dispatcher takes the layer's `forward` and
adds what its adapters contribute. The model's own module tree and state dict stay untouched,
several adapters stack on one layer, and detaching the last one restores the layer.

Two ways to add the adapters, chosen per call:
- while adapters are trained (grad enabled and some adapter tensor requires grad):
  base(x) + sum of multiplier * scale * delta(x), each delta on its cheapest path (factored
  for LoKr), so the backward pass never touches a full-size weight gradient;
- otherwise (inference): one call of the layer's op with W + sum of multiplier * scale * dW,
  rebuilt in float32 and cast to the weight's dtype, and kept until a weight, a scale or the
  set of adapters changes. An unfused adapter then runs at the base's speed, for the memory
  of one extra copy of each patched weight (fusing avoids that copy).
While no adapter of a layer is active (all fused, disabled or at multiplier 0) the layer's own
forward is put back, so a fused model runs exactly the base's code.

Under torch.compile the forward has no host sync and no Python branch on tensor values: alpha,
the rank and the scale are plain numbers cached when set, module dropout multiplies by a random
0/1 instead of skipping, and the inference path rebuilds W + dW inside the graph instead of
keeping a cached copy, so the compiled graph is one graph per path, stable across steps.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .algos.common import Algorithm, apply_weight, scalar_target
from .errors import ConfigError
from .storage import FP8, StoredLayer


class _Holder(nn.Module):
    """Gives a dotted tensor name its own level ('lora_down.weight'), so the native state dict
    of an adapter network is exactly the file layout."""


class _Dispatch:
    """Installed as `base.forward`: the layer's own forward plus its active adapters."""

    def __init__(self, base: nn.Module) -> None:
        self.base = base
        self.had_own_forward = "forward" in base.__dict__
        self.original = base.forward
        self.adapters: list[AdapterModule] = []
        # a weight stored narrower than it computes (fp8...): adapters add their output, also in
        # inference, rather than patching a full-size copy of the weight
        self.stored = isinstance(base, StoredLayer)
        self._merged_key: tuple | None = None
        self._merged_weight: torch.Tensor | None = None

    def refresh(self) -> None:
        """Route the layer through this dispatcher only while some adapter is active: per-call
        Python work costs real time on a GPU with hundreds of small layers."""
        if any(a.active for a in self.adapters):
            self.base.forward = self
            return
        self._merged_weight = self._merged_key = None  # nothing to add: drop the patched copy
        if self.had_own_forward:
            self.base.forward = self.original
        else:
            self.base.__dict__.pop("forward", None)

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = [a for a in self.adapters if a.active]
        if not active:
            return self.original(x, *args, **kwargs)
        training = torch.is_grad_enabled() and any(p.requires_grad for a in active for p in a.parameters())
        if not training and not self.stored:
            return self._merged(x, active)
        out = self.original(x, *args, **kwargs)
        compiling = torch.compiler.is_compiling()
        for a in active:
            if training and a.training and a.module_dropout:
                keep = torch.rand(()) >= a.module_dropout  # drawn before the delta's own draws
                if compiling:  # no host sync: a dropped module adds 0 (its gradient is 0, not None)
                    out = out + a.delta(x).to(out.dtype) * keep
                    continue
                if not keep:
                    continue
            out = out + a.delta(x).to(out.dtype)
        return out

    def _build_merged(self, active: list[AdapterModule]) -> torch.Tensor:
        """W + sum of multiplier * scale * dW, rebuilt in float32, in the weight's dtype."""
        weight = self.base.weight
        w = weight.float()
        for a in active:
            w = w + a.multiplier * a.delta_weight().to(w.device, torch.float32)
        return w.to(weight.dtype)

    def _merged(self, x: torch.Tensor, active: list[AdapterModule]) -> torch.Tensor:
        base = self.base
        if torch.compiler.is_compiling():
            w = self._build_merged(active)  # part of the graph: no cache keyed on tensor versions
        else:
            key = (id(base.weight), base.weight._version, base.weight.device, base.weight.dtype,
                   tuple((id(a), a.multiplier, a.alpha._version, tuple(p._version for p in a.parameters()))
                         for a in active))
            if key != self._merged_key:
                self._merged_weight = None  # free the old copy before building the new one
                with torch.no_grad():
                    self._merged_weight = self._build_merged(active)
                self._merged_key = key
            w = self._merged_weight
        if isinstance(base, nn.Conv2d):
            return base._conv_forward(x, w, base.bias)
        return F.linear(x, w, base.bias)

    def remove(self, adapter: AdapterModule) -> None:
        self.adapters.remove(adapter)
        self.refresh()
        if not self.adapters:
            del self.base._lokr_dispatch


def rank_dropout_mask(n: int, p: float, by_kept_fraction: bool, device: torch.device | None = None) -> torch.Tensor:
    """Keep (1) or drop (0) each of `n` output channels with probability `p`, rescaled.

    Drawn as LyCORIS draws it (`rand(n) > p`). Rescaled by the expected kept fraction
    1 / (1 - p) (as dropout does), or with `by_kept_fraction` (LyCORIS `rank_dropout_scale`) by
    the fraction actually kept in this draw; all dropped gives zeros, not NaN. LyCORIS without
    `rank_dropout_scale` does not rescale at all.
    """
    keep = (torch.rand(n, device=device) > p).float()
    if by_kept_fraction:
        return keep / keep.mean().clamp_min(1.0 / n)
    return keep / (1.0 - p)


class AdapterModule(nn.Module):
    """The trainable (or loaded) tensors of one layer plus the rules to apply them."""

    def __init__(self, key: str, base: nn.Module, algo: Algorithm, tensors: dict[str, torch.Tensor],
                 alpha: float, multiplier: float = 1.0, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0, use_scalar: bool = False, rank_dropout_scale: bool = False) -> None:
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
            # a Parameter is kept as given: the row slices of one fused file module share theirs
            owner.register_parameter(leaf, t if isinstance(t, nn.Parameter) else nn.Parameter(t))
        self.register_buffer("alpha", torch.tensor(float(alpha), dtype=torch.float32))
        # use_scalar (LyCORIS): a learnable factor on the update, 0 at first so that both factors
        # can start non-zero; files never hold it, it is folded into one factor (file_tensors)
        self.scalar = nn.Parameter(torch.zeros((), device=next(iter(tensors.values())).device)) if use_scalar else None
        self._rank = algo.rank(self.tensors())  # from shapes only: fixed for the module's life
        self._cache_scale()
        self._attached = False
        self._state = {"multiplier": float(multiplier), "enabled": True, "merged": False}
        self.rank_dropout = float(rank_dropout)
        self.module_dropout = float(module_dropout)
        self.rank_dropout_scale = bool(rank_dropout_scale)

    @property
    def base(self) -> nn.Module:
        return self._base[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Tensors under their file names (e.g. 'lokr_w1', 'lora_down.weight')."""
        return {n: self.get_parameter(n) for n in self.tensor_names}

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors as a file stores them: with `use_scalar`, the scalar multiplied into one
        factor (LyCORIS's choice, see `scalar_target`), so every loader gets the same update."""
        t = self.tensors()
        if self.scalar is not None:
            name = scalar_target(t.keys())
            t[name] = t[name] * self.scalar
        return t

    def _cache_scale(self) -> None:
        """alpha as a Python number: the forward reads it without a host sync (Tensor.item() is
        a device sync and a graph break under torch.compile). Kept in step with the buffer,
        which is what files and state dicts hold, whenever a state dict is loaded."""
        self._alpha = float(self.alpha)
        self._scale = 1.0 if self._rank is None else self._alpha / self._rank

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._cache_scale()

    @property
    def scale(self) -> float:
        """alpha / rank (1 where the algorithm has no rank), a Python float."""
        return self._scale

    def delta_weight(self) -> torch.Tensor:
        """multiplier-free scaled dW in the adapter's dtype, shaped like the base weight."""
        dw = self.algo.delta_weight(self.tensors(), tuple(self.base.weight.shape)) * self.scale
        return dw if self.scalar is None else dw * self.scalar

    # -- forward -----------------------------------------------------------------------------
    def _set(self, name: str, value) -> None:
        self._state[name] = value
        if self._attached:
            self.base.__dict__["_lokr_dispatch"].refresh()

    multiplier = property(lambda self: self._state["multiplier"], lambda self, v: self._set("multiplier", float(v)))
    enabled = property(lambda self: self._state["enabled"], lambda self, v: self._set("enabled", bool(v)))
    merged = property(lambda self: self._state["merged"], lambda self, v: self._set("merged", bool(v)))

    @property
    def active(self) -> bool:
        return self.enabled and not self.merged and self.multiplier != 0.0

    def attach(self) -> None:
        if self._attached:
            return
        base = self.base
        dispatch = base.__dict__.get("_lokr_dispatch")
        if dispatch is None:
            dispatch = _Dispatch(base)
            base.__dict__["_lokr_dispatch"] = dispatch
        dispatch.adapters.append(self)
        self._attached = True
        dispatch.refresh()

    def detach(self) -> None:
        if self._attached:
            self.base.__dict__["_lokr_dispatch"].remove(self)
            self._attached = False

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """multiplier * scale * dW applied to x: the factored path where the algorithm has one."""
        t = self.tensors()
        dtype = next(iter(t.values())).dtype
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(dtype)  # adapter math in the adapter's dtype (fp32), cast back by the caller
        r = self._rank
        s = self.multiplier if r is None else self._alpha * (self.multiplier / r)
        if self.scalar is not None:
            s = self.scalar.to(x.dtype) * s
        y = self.algo.forward(x, t, self.base, scale=s)  # LoKr folds s into a small factor
        if y is None:
            w = self.algo.delta_weight(t, tuple(self.base.weight.shape))
            y = apply_weight(x, w.to(x.dtype) * s, self.base)
        if self.training and self.rank_dropout:
            keep = rank_dropout_mask(y.shape[1] if y.dim() == 4 else y.shape[-1], self.rank_dropout,
                                     self.rank_dropout_scale, y.device).to(y.dtype)
            y = y * (keep.view(1, -1, 1, 1) if y.dim() == 4 else keep)
        return y

    # -- merge ---------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, multiplier: float | None = None) -> None:
        """Add multiplier * scale * dW into the base weight (fp32 math, cast to its dtype)."""
        if self.merged:
            return
        if self.base.weight.dtype == FP8:
            raise ConfigError(f"{self.key}: cannot fuse into a base weight stored in fp8 (3 mantissa bits: the "
                              "update would mostly round away); apply the adapter unfused, or load the base in "
                              "bf16 or fp32 to fuse")
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


class RowSliceAdapter(AdapterModule):
    """One layer's rows of an update stored for a fused layer of the original model.

    Kohya-style Flux files patch `img_attn.qkv` (q, k and v stacked by rows) where Diffusers has
    three layers. A LoKr or LoHa update of the stacked matrix is no product per layer, so each
    layer gets the full fused dW, rebuilt from the factors its sibling slices share, cut to its
    `rows`: (start, stop) ranges of the fused rows, concatenated in order. Merging, scaling,
    enabling and detaching work per layer as for any AdapterModule.
    """

    def __init__(self, key: str, base: nn.Module, algo: Algorithm, tensors: dict[str, torch.Tensor],
                 alpha: float, rows: tuple[tuple[int, int], ...], fused_shape: tuple[int, ...],
                 multiplier: float = 1.0) -> None:
        super().__init__(key, base, algo, tensors, alpha, multiplier=multiplier)
        self.rows = tuple((int(s), int(e)) for s, e in rows)
        self.fused_shape = tuple(int(n) for n in fused_shape)

    def delta_weight(self) -> torch.Tensor:
        full = self.algo.delta_weight(self.tensors(), self.fused_shape)
        return torch.cat([full[s:e] for s, e in self.rows]) * self.scale

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """multiplier * this layer's rows of the scaled fused dW, applied to x (no factored path:
        the rows of a product are no product of the factors' rows in general)."""
        w = self.delta_weight() * self.multiplier
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(w.dtype)
        return apply_weight(x, w.to(x.dtype), self.base)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rows {list(self.rows)} of {self.fused_shape}"

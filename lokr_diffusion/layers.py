"""AdapterModule: one adapter attached to one nn.Linear / nn.Conv2d of a frozen model.

The adapter does not replace the layer: a small dispatcher takes the layer's `forward` and
adds what its adapters contribute. The model's own module tree and state dict stay untouched,
several adapters stack on one layer, and detaching the last one restores the layer.

Two ways to add the adapters, chosen per call:
- while adapters are trained (grad enabled and some adapter tensor requires grad):
  base(x) + sum of multiplier * scale * delta(x), each delta on its cheapest path (factored
  for LoKr), so the backward pass never touches a full-size weight gradient. Where dW has to
  be rebuilt or is cheaper rebuilt (LoHa; LoKr on layers with many tokens and few features)
  and the layer computes in fp32, W + dW goes into the layer's own product for the call: one
  full-size product more than the frozen layer (the weight gradient) instead of three; a LoKr
  linear or 1x1 conv layer can also fold dW detached and give its factors their gradients from
  the activations (a FoldedUpdate), which adds no full-size product at all;
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

from .algos.common import Algorithm, FoldedUpdate, apply_weight, scalar_target
from .dora import decomposed_delta, factored_change, row_gain, update_row_terms
from .errors import ConfigError
from .storage import FP8, StoredLayer


DORA_TENSOR = "dora_scale"  # the file name of a DoRA module's magnitude vector


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
        fold = training and self._can_fold(x, active)
        base_out = None if fold else self.original(x, *args, **kwargs)
        compiling = torch.compiler.is_compiling()
        outputs, updates, folded = [], [], []
        for a in active:
            keep = None
            if training and a.training and a.module_dropout:
                keep = torch.rand(()) >= a.module_dropout  # drawn before the delta's own draws
                if not compiling:  # under compile no host sync: a dropped module adds 0 (its gradient is 0, not None)
                    if not keep:
                        continue
                    keep = None
            y = a.delta(x, base_out, fold=fold)
            if y is None:  # cheaper rebuilt: added to the layer's weight for this call
                u = a.multiplier * a.delta_weight()
                updates.append(u if keep is None else u * keep)
            elif isinstance(y, FoldedUpdate):  # in the weight too, its gradients from the activations
                updates.append(y.weight if keep is None else y.weight * keep)
                folded.append((y, keep))
            else:
                outputs.append((y, keep))
        if fold:
            base_out = self._apply(x, self.base.weight + sum(updates)) if updates else self.original(x, *args, **kwargs)
            for f, keep in folded:
                base_out = f.gradients(base_out, keep)
        out = base_out
        for y, keep in outputs:
            out = out + (y.to(out.dtype) if keep is None else y.to(out.dtype) * keep)
        return out

    def _can_fold(self, x: torch.Tensor, active: list[AdapterModule]) -> bool:
        """Whether a rebuilt update may be added to the layer's weight for a training call: one
        full-size product (the weight gradient) instead of three. Only for an fp32 layer with
        its own forward on fp32 input (a narrower sum would round the small update away), and
        without DoRA (whose change is computed from the frozen layer's own output)."""
        return (not self.stored and not self.had_own_forward and self.base.weight.dtype == torch.float32
                and x.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type)
                and not any(a.dora for a in active))

    def _apply(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The layer's own operation (bias and conv geometry included) with `weight` in place of its weight."""
        base = self.base
        if isinstance(base, nn.Conv2d):
            return base._conv_forward(x, weight, base.bias)
        return F.linear(x, weight, base.bias)

    def _build_merged(self, active: list[AdapterModule]) -> torch.Tensor:
        """W + sum of multiplier * scale * dW, rebuilt in float32, in the weight's dtype."""
        weight = self.base.weight
        w = weight.float()
        for a in active:  # in order: a DoRA module normalises the weight the adapters before it left
            w = w + a.multiplier * a.delta_weight(w if a.dora else None).to(w.device, torch.float32)
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
        return self._apply(x, w)

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
        # DoRA: a magnitude vector beside the factors rescales W + D (lokr_diffusion.dora)
        self.dora = DORA_TENSOR in self.tensor_names
        if self.dora and use_scalar:
            raise ConfigError(f"{key}: use_scalar together with a DoRA magnitude (dora_scale) is not supported")
        self._rank = algo.rank(self.factors())  # from shapes only: fixed for the module's life
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
        """Tensors under their file names (e.g. 'lokr_w1', 'lora_down.weight', 'dora_scale')."""
        return {n: self.get_parameter(n) for n in self.tensor_names}

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors as a file stores them: with `use_scalar`, the scalar multiplied into one
        factor (LyCORIS's choice, see `scalar_target`), so every loader gets the same update."""
        t = self.tensors()
        if self.scalar is not None:
            name = scalar_target(t.keys())
            t[name] = t[name] * self.scalar
        return t

    def factors(self) -> dict[str, torch.Tensor]:
        """The algorithm's own tensors: `tensors()` without the DoRA magnitude."""
        return {n: self.get_parameter(n) for n in self.tensor_names if n != DORA_TENSOR}

    def base_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The frozen layer's weight in `dtype` (a narrower stored weight widened), detached:
        what a DoRA module normalises against."""
        base = self.base
        w = base.dense_weight(dtype) if isinstance(base, StoredLayer) else base.weight.to(dtype)
        return w.detach()

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

    def delta_weight(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """multiplier-free scaled dW in the adapter's dtype, shaped like the base weight; for
        DoRA the change W' - W of the decomposed weight against `weight` (by default the layer's
        current weight: stacked adapters pass the weight the ones before them made)."""
        update = self.algo.delta_weight(self.factors(), tuple(self.base.weight.shape)) * self.scale
        if self.scalar is not None:
            update = update * self.scalar
        if self.dora:
            magnitude = self.get_parameter(DORA_TENSOR)
            w = self.base_weight(update.dtype) if weight is None else weight.to(update.dtype)
            return decomposed_delta(w, update, magnitude.to(update.dtype))
        return update

    # -- forward -----------------------------------------------------------------------------
    def _set(self, name: str, value) -> None:
        self._state[name] = value
        if self._attached:
            self.base.__dict__["_lokr_dispatch"].refresh()

    multiplier = property(lambda self: self._state["multiplier"], lambda self, v: self._set("multiplier", float(v)))
    enabled = property(lambda self: self._state["enabled"], lambda self, v: self._set("enabled", bool(v)))
    def _set_merged(self, value: bool) -> None:
        if not value:  # unfused by whoever kept the weight (fuse_adapter): a DoRA copy is not needed
            self.__dict__.pop("_unmerged_weight", None)
        self._set("merged", bool(value))

    merged = property(lambda self: self._state["merged"], _set_merged)

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

    def delta(self, x: torch.Tensor, base_out: torch.Tensor | None = None,
              fold: bool = False) -> torch.Tensor | FoldedUpdate | None:
        """multiplier * scale * dW applied to x: the factored path where the algorithm has one.

        `base_out` is the frozen layer's output for x: a DoRA module rescales it per output
        channel instead of rebuilding W + D (lokr_diffusion.dora). With `fold` (the caller can
        add a weight to the layer's own for this call), None where rebuilding dW is the cheaper
        way: the caller then adds multiplier * `delta_weight()` to the layer's weight; or the
        algorithm's FoldedUpdate (already scaled), whose weight the caller adds."""
        t = self.factors()
        dtype = next(iter(t.values())).dtype
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(dtype)  # adapter math in the adapter's dtype (fp32), cast back by the caller
        r = self._rank
        s = self.multiplier if r is None else self._alpha * (self.multiplier / r)
        if self.scalar is not None:
            s = self.scalar.to(x.dtype) * s
        if self.dora:
            y = self._dora_factored(x, t, base_out)
            if y is None:  # the norm of W + D from the rebuilt update
                y = apply_weight(x, (self.delta_weight() * self.multiplier).to(x.dtype), self.base)
        else:
            fold = fold and not (self.training and self.rank_dropout)  # the mask applies to the output
            y = self.algo.forward(x, t, self.base, scale=s, fold=fold)  # LoKr folds s into a small factor
            if fold and not isinstance(y, torch.Tensor):  # None or a FoldedUpdate: the caller folds it
                return y
        if y is None:
            w = self.algo.delta_weight(t, tuple(self.base.weight.shape))
            y = apply_weight(x, w.to(x.dtype) * s, self.base)
        if self.training and self.rank_dropout:
            keep = rank_dropout_mask(y.shape[1] if y.dim() == 4 else y.shape[-1], self.rank_dropout,
                                     self.rank_dropout_scale, y.device).to(y.dtype)
            y = y * (keep.view(1, -1, 1, 1) if y.dim() == 4 else keep)
        return y

    def _dora_factored(self, x: torch.Tensor, factors: dict[str, torch.Tensor],
                       base_out: torch.Tensor | None) -> torch.Tensor | None:
        """multiplier * (W' - W) x without forming W + D: the row norms from contractions of W
        with the factors, D x on the algorithm's factored path; None where either is missing
        (a magnitude per input column, LoHa, a grouped conv, the cost model preferring a rebuild)."""
        magnitude = self.get_parameter(DORA_TENSOR)
        if base_out is None or magnitude.shape[0] != self.base.weight.shape[0] or magnitude.shape[1] != 1:
            return None
        update_x = self.algo.forward(x, factors, self.base, scale=self.scale)
        if update_x is None:
            return None
        weight = self.base_weight(magnitude.dtype)
        terms = update_row_terms(self.algo.NAME, factors, weight)
        if terms is None:
            return None
        gain = row_gain(weight, *terms, self.scale, magnitude)
        conv = isinstance(self.base, nn.Conv2d)
        bias = self.base.bias
        wx = base_out if bias is None else base_out - (bias.view(1, -1, 1, 1) if conv else bias)
        return factored_change(wx.to(update_x.dtype), update_x, gain.to(update_x.dtype), conv) * self.multiplier

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
        if self.dora:  # its change depends on W itself: keep W to put it back exactly
            self._unmerged_weight = w.detach().to("cpu", copy=True)  # off the accelerator while fused
        w.copy_((w.float() + m * self.delta_weight().float().to(w.device)).to(w.dtype))
        self._merged_multiplier = m
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.base.weight
        if self.dora:
            w.copy_(self._unmerged_weight.to(w.device))
        else:
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

    def delta_weight(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """This layer's rows of the scaled fused dW (`weight` is for DoRA, which row slices never are)."""
        full = self.algo.delta_weight(self.factors(), self.fused_shape)
        return torch.cat([full[s:e] for s, e in self.rows]) * self.scale

    def delta(self, x: torch.Tensor, base_out: torch.Tensor | None = None, fold: bool = False) -> torch.Tensor | None:
        """multiplier * this layer's rows of the scaled fused dW, applied to x (no factored path:
        the rows of a product are no product of the factors' rows in general); with `fold`,
        None: the caller adds those rows to the layer's weight."""
        if fold:
            return None
        w = self.delta_weight() * self.multiplier
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(w.dtype)
        return apply_weight(x, w.to(x.dtype), self.base)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rows {list(self.rows)} of {self.fused_shape}"


def drop_merged_copies(model: nn.Module) -> int:
    """Free the merged weight copies that no-grad forwards keep (see the module docstring) for
    every adapter under `model`; returns how many layers held one. A training run that scores
    or samples between steps gives that memory back to training this way: the copies would
    otherwise stay until the next no-grad forward."""
    freed = 0
    for module in model.modules():
        if isinstance(module, AdapterModule):
            dispatch = module.base.__dict__.get("_lokr_dispatch")
            if dispatch is not None and dispatch._merged_weight is not None:
                dispatch._merged_weight = dispatch._merged_key = None
                freed += 1
    return freed

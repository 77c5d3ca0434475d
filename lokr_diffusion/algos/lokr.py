"""LoKr: dW = kron(w1, w2), w1 small (a, c), w2 big (b, d[, kh, kw]), either optionally low-rank.

Provides the `Algorithm` protocol (algos/common.py), plus the cost model that picks how
`forward` applies the product (`plan`, `path_costs`, `force_path`) and the factor builders
(`make_w1`, `make_w2`) that the tools and the bench use.
"""
from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import torch
from torch import nn

from ..kron import factorization, kron
from ..kron_autograd import kron_conv2d, kron_conv2d_grads, kron_linear, kron_linear_grads
from .common import FoldedUpdate, ModuleSettings, kaiming_, tucker_applies, weight_dims

NAME = "lokr"
TENSOR_NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def detect(names: set[str]) -> bool:
    """Any w1 or w2 form present, as the UIs check it."""
    return bool(names & {"lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a"})


def factor_shapes(weight_shape: tuple[int, ...], factor: int, unbalanced: bool = False) -> tuple[int, int, int, int]:
    """(a, b, c, d): out = a*b, in = c*d, the split every file tensor shape follows.

    `unbalanced` (LyCORIS `unbalanced_factorization`) swaps the output split only, so w1 gets
    the larger output factor (a >= b) while the input split stays small-first.
    """
    out_dim, in_dim, _ = weight_dims(weight_shape)
    a, b = factorization(out_dim, factor)
    if unbalanced:
        a, b = b, a
    c, d = factorization(in_dim, factor)
    return a, b, c, d


def init_tensors(weight_shape: tuple[int, ...], settings: ModuleSettings) -> dict[str, torch.Tensor]:
    """LyCORIS initialisation: w2 (or w2_b) zero, the rest Kaiming, so dW starts at exactly 0
    (with `use_scalar` w2 is Kaiming too: the module's scalar, 0 at first, holds dW at 0).

    With `use_tucker` on a k x k conv whose w2 is low-rank, w2 is a Tucker product as LyCORIS
    writes it: core lokr_t2 (r, r, kh, kw), lokr_w2_a (r, b) (transposed against the plain
    form) and lokr_w2_b (r, d) (zero).
    """
    _, _, kernel = weight_dims(weight_shape)
    s = settings
    a, b, c, d = factor_shapes(weight_shape, s.factor, s.unbalanced)
    k = math.prod(kernel)
    r = s.dim
    t: dict[str, torch.Tensor] = {}
    if s.decompose_both and not s.full_matrix and r < max(a, c) / 2:
        t["lokr_w1_a"] = kaiming_(torch.empty(a, r))
        t["lokr_w1_b"] = kaiming_(torch.empty(r, c))
    else:
        t["lokr_w1"] = kaiming_(torch.empty(a, c))
    if not s.full_matrix and r < max(b, d) / 2 and tucker_applies(s, kernel):
        t["lokr_t2"] = kaiming_(torch.empty(r, r, *kernel))
        t["lokr_w2_a"] = kaiming_(torch.empty(r, b))
        t["lokr_w2_b"] = _second(torch.empty(r, d), s.use_scalar)
    elif not s.full_matrix and r < max(b, d) / 2:
        t["lokr_w2_a"] = kaiming_(torch.empty(b, r))
        t["lokr_w2_b"] = _second(torch.empty(r, d * k), s.use_scalar)
    else:
        t["lokr_w2"] = _second(torch.empty(b, d, *kernel), s.use_scalar)
    return t


def _second(t: torch.Tensor, use_scalar: bool) -> torch.Tensor:
    """The factor that holds dW at 0: zero, or Kaiming when a scalar does that instead."""
    return kaiming_(t) if use_scalar else t.zero_()


def make_w1(t: dict[str, torch.Tensor]) -> torch.Tensor:
    return t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]


def make_w2(t: dict[str, torch.Tensor], b: int, d: int, kernel: tuple[int, ...]) -> torch.Tensor:
    """w2 as (b, d, *kernel) from whichever form the file stores."""
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        # Tucker core: w2[p, q, k, l] = sum_ij t2[i, j, k, l] * w2_a[i, p] * w2_b[j, q]
        w2 = torch.einsum("ijkl,ip,jq->pqkl", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"].flatten(1)  # a 4-D w2_b (r, d, kh, kw) flattens too
    return w2.reshape(b, d, *kernel)


def delta_weight(tensors: dict[str, torch.Tensor], weight_shape: tuple[int, ...]) -> torch.Tensor:
    """kron(w1, w2) from whichever forms the file stores, reshaped to the base weight."""
    out_dim, in_dim, kernel = weight_dims(weight_shape)
    w1 = make_w1(tensors)
    a, c = w1.shape
    if out_dim % a or in_dim % c:
        raise ValueError(f"w1 of shape {tuple(w1.shape)} does not divide the weight {tuple(weight_shape)}")
    w2 = make_w2(tensors, out_dim // a, in_dim // c, kernel)
    return kron(w1, w2).reshape(weight_shape)


def rank(tensors: dict[str, torch.Tensor]) -> int | None:
    """The rank behind alpha / r: w2's if it is decomposed, else w1's; None (scale 1) if both full."""
    if "lokr_w2_b" in tensors:
        return int(tensors["lokr_w2_b"].shape[0])
    if "lokr_w1_b" in tensors:
        return int(tensors["lokr_w1_b"].shape[0])
    return None


# -- applying the update to activations --------------------------------------------------------
#
# Ways to compute scale * linear/conv(x, kron(w1, w2)):
#   "rebuild":  form dW (out x in [x k]). Run as a product of its own, training pays three
#               full-size products (forward, input gradient, weight gradient); folded into the
#               layer's own weight for the call (`fold`: the dispatcher can do it for an fp32
#               layer), only one, the weight gradient, plus a few weight-sized passes.
#   "fold-in", "fold-tok" (training, `fold`; convs only "fold-in"): dW detached in the layer's
#               weight, so the forward and the input gradient are the frozen layer's own
#               products, and the factors' gradients come from the activations in that order
#               (the factored backward pass without its input gradient:
#               kron_autograd.kron_linear_grads, kron_conv2d_grads).
#   factored:   contract with w2 and w1 separately (lokr_diffusion.kron_autograd): far fewer
#               multiply-adds, but several passes over activation-sized tensors. Orders:
#               "in" (w1 mixes the input groups first), "out" (w2 first, w1 mixes the output
#               groups), and for linear layers "tok" (token-major: no transposing copies, small
#               batched products for the w1 mix).
# `plan` prices them with a three-term model, time = flops / F + bytes moved / B + kernels * O,
# and picks the cheapest. Element counts below are reads plus writes of activation-sized
# tensors per token; operations that read or write the large side through a strided view are
# counted 1.5 times. The constants are fitted to per-layer timings of the SD-shaped UNet in
# bench/bench_speed.py (its "path choice against measurement" table re-checks them).

COST_CONSTANTS = {  # device type -> (flop/s, bytes/s, seconds per kernel incl. Python dispatch)
    "cpu": (1.3e11, 1.2e10, 4e-5),
    "cuda": (3.0e14, 3.0e12, 8e-6),
}


def _cost(flops: float, elems: float, kernels: int, esize: int, device_type: str) -> float:
    f, bw, o = COST_CONSTANTS.get(device_type, COST_CONSTANTS["cpu"])
    return flops / f + elems * esize / bw + kernels * o


def path_costs(kind: str, n_in: int, n_out: int, a: int, b: int, c: int, d: int, k: int = 1,
               training: bool = True, esize: int = 4, device_type: str = "cpu",
               fold: bool = False) -> dict[str, float]:
    """Estimated seconds of each path for one layer: {"rebuild", "in", "out"[, "tok"]: seconds}.

    kind: "linear" or "conv" (NCHW). n_in / n_out: tokens (linear) or pixels times batch (conv)
    at the input and the output; k: kernel size kh*kw. fold: a rebuilt dW is added to the
    layer's weight for the call instead of running as a product of its own.
    """
    cin, cout = c * d, a * b
    w = cout * cin * k  # full kernel size
    ad, cb = a * d, c * b
    if training and fold:
        # W + dW built, the weight gradient (reads x and the output gradient; its output is
        # weight-sized and it reduces over the tokens: measured at about two thirds of the
        # forward product's rate), reduced to the two factors' gradients
        rebuild = _cost(3.0 * n_out * cout * cin * k, n_in * cin + n_out * cout + 10 * w, 4, esize, device_type)
    elif training:
        rebuild = _cost(6.0 * n_out * cout * cin * k, 3 * (n_in * cin + n_out * cout) + 6 * w, 9, esize, device_type)
    else:
        rebuild = _cost(2.0 * n_out * cout * cin * k, n_in * cin + n_out * cout + 2 * w, 4, esize, device_type)
    if kind == "linear":
        n = n_in
        mix_in, mix_out = a * c * d, a * c * b  # multiply-adds per token of a w1 mix on each side
        w2_in, w2_out = a * d * b, c * d * b  # ... of the w2 product after / before the mix
        if training:
            # in:  regroup, mix, w2 (strided out) | mix again, w2 grad, input-side grad, w1 grad, mix, copy back
            fin = _cost(2.0 * n * (4 * mix_in + 3 * w2_in), n * (8 * cin + 7 * ad + 4.5 * cout), 10, esize, device_type)
            # out: w2 (strided in), mix, copy | copy, mix, w2 again, w1 grad, w2 grad, input grad (strided)
            fout = _cost(2.0 * n * (3 * mix_out + 4 * w2_out), n * (6 * cin + 7 * cb + 7 * cout), 10, esize, device_type)
            # tok: flat w2 products, no copies, but the batched small mixes run far below memory
            # speed (fitted: they win only where per-kernel overhead dominates, few tokens)
            ftok = _cost(2.0 * n * (4 * mix_in + 3 * w2_in), n * (8 * cin + 14 * ad + 4 * cout), 8, esize, device_type)
        else:
            fin = _cost(2.0 * n * (mix_in + w2_in), n * (3 * cin + 2 * ad + 1.5 * cout), 3, esize, device_type)
            fout = _cost(2.0 * n * (w2_out + mix_out), n * (1.5 * cin + 2 * cb + 3 * cout), 3, esize, device_type)
            ftok = _cost(2.0 * n * (mix_in + w2_in), n * (2 * cin + 3 * ad + cout), 2, esize, device_type)
        costs = {"rebuild": rebuild, "in": fin, "out": fout, "tok": ftok}
        if training and fold:  # dW detached in the weight (three weight-sized passes), factor gradients only
            grads = 2.0 * n * (2 * mix_in + 2 * w2_in)
            # in: regroup (shared by q/k/v), mix, w2 grad, output mix, w1 grad
            costs["fold-in"] = _cost(grads, n * (5.5 * cin + 4 * ad + 3 * cout) + 3 * w, 8, esize, device_type)
            # tok: two small batched mixes (slow, as in "tok"), two flat products
            costs["fold-tok"] = _cost(grads, n * (2 * cin + 10 * ad + 2 * cout) + 3 * w, 7, esize, device_type)
        return costs
    conv_in = 2.0 * n_out * a * b * d * k  # w2's convolution over the a mixed groups
    conv_out = 2.0 * n_out * c * b * d * k  # ... over the c input groups
    costs = {}
    # dW detached in the weight; "in"'s backward without the input gradient. Offered for 1x1
    # convs only: with a k x k kernel the convolution backward over the a groups ran 2-10x
    # slower than this model says on small images (measured per layer), slower than "in"/"out".
    if training and fold and k == 1:
        costs["fold-in"] = _cost(2 * conv_in + 2.0 * n_in * 2 * a * c * d,
                                 n_in * (2 * cin + 4 * ad) + n_out * cout + 3 * w, 6, esize, device_type)
    if training:
        # "in": mix, conv | recompute mix, conv backward (2 convs), w1 grad, input mix
        fin = _cost(3 * conv_in + 2.0 * n_in * 4 * a * c * d,
                    n_in * (4 * cin + 6 * ad) + n_out * 3 * cout, 10, esize, device_type)
        # "out": conv, mix | w1 grad (a 1x1 conv's t is recomputed, a k x k one is kept), output
        # mix, conv backward
        redo = n_in * cin + n_out * cb if k == 1 else 0
        fout = _cost(3 * conv_out + 2.0 * n_out * 3 * a * c * b,
                     n_in * 3 * cin + n_out * (7 * cb + 4 * cout) + redo, 10, esize, device_type)
    else:
        fin = _cost(conv_in + 2.0 * n_in * a * c * d, n_in * (cin + 2 * ad) + n_out * cout, 3, esize, device_type)
        fout = _cost(conv_out + 2.0 * n_out * a * c * b, n_in * cin + n_out * (2 * cb + cout), 3, esize, device_type)
    return {"rebuild": rebuild, "in": fin, "out": fout, **costs}


@functools.lru_cache(maxsize=4096)
def plan(kind: str, n_in: int, n_out: int, a: int, b: int, c: int, d: int, k: int = 1, training: bool = True,
         esize: int = 4, device_type: str = "cpu", fold: bool = False) -> str:
    """"rebuild", "in", "out", "tok", "fold-in" or "fold-tok": the cheapest path by `path_costs`.
    A pure function of shapes."""
    costs = path_costs(kind, n_in, n_out, a, b, c, d, k, training, esize, device_type, fold)
    return min(costs, key=costs.get)


_forced_path: str | None = None
PATHS = ("in", "out", "tok", "rebuild", "fold-in", "fold-tok")


@contextlib.contextmanager
def force_path(path: str | None) -> Iterator[None]:
    """Make every LoKr layer take `path` ("in", "out", "tok", "rebuild", "fold-in" or "fold-tok")
    instead of `plan`'s choice.

    For benchmarks and tests that compare the paths; None restores the cost model. Where a path
    does not apply, the nearest one does: "tok" on a conv is "in" ("fold-tok" "fold-in"), and
    "fold-*" is the factored order where the caller cannot fold.
    """
    global _forced_path
    if path not in (None, *PATHS):
        raise ValueError(f"force_path: expected one of {PATHS} or None, got {path!r}")
    previous, _forced_path = _forced_path, path
    try:
        yield
    finally:
        _forced_path = previous


def forward(x: torch.Tensor, tensors: dict[str, torch.Tensor], base: nn.Module,
            scale: float | torch.Tensor | None = None, fold: bool = False) -> torch.Tensor | FoldedUpdate | None:
    """kron(w1, w2) applied without forming it: (w1 (x) w2) vec(X) = vec(w1 X w2^T).

    Linear: the input features are viewed as (c, d); w2 contracts d, w1 mixes c. Conv: the c
    groups of d channels run through w2's kernel as one batched conv, and w1 mixes the groups
    (or the other way round). The backward pass only ever touches the small factors (see
    lokr_diffusion.kron_autograd). Returns None where rebuilding dW is cheaper (`plan`) or the
    layer has a geometry the factored path does not cover (grouped convs, string padding).

    `scale` (multiplier * alpha / r), when given, is folded into w1 rather than applied to the
    output, which saves a full pass over the activations; the result is then already scaled.
    `fold`: the caller adds a rebuilt dW to the layer's weight, which makes rebuilding cheaper;
    in training the layer may then get a FoldedUpdate (paths "fold-in", "fold-tok"): dW for
    the weight, with the factors' gradients taken from the activations.
    """
    t = tensors
    dev = x.device.type
    if torch.is_autocast_enabled(dev):  # run in the autocast dtype, with autocast off inside
        cdtype = torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            return forward(x.to(cdtype), {name: v.to(cdtype) for name, v in t.items()}, base, scale, fold)
    out_dim, in_dim, kernel = weight_dims(base.weight.shape)
    w1 = make_w1(t)
    a, c = w1.shape
    if out_dim % a or in_dim % c:
        return None
    b, d = out_dim // a, in_dim // c
    is_conv = isinstance(base, nn.Conv2d)
    k = 1
    if is_conv:
        if (base.groups != 1 or isinstance(base.padding, str) or base.padding_mode != "zeros"
                or x.dim() != 4):
            return None
        k = math.prod(kernel)
        n, _, h, w = x.shape
        (sh, sw), (ph, pw), (dh, dw) = base.stride, base.padding, base.dilation
        ho = (h + 2 * ph - dh * (kernel[0] - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kernel[1] - 1) - 1) // sw + 1
        n_in, n_out = n * h * w, n * ho * wo
    else:
        n_in = n_out = x.numel() // in_dim
    training = torch.is_grad_enabled() and (x.requires_grad or any(v.requires_grad for v in t.values()))
    choose = plan.__wrapped__ if torch.compiler.is_compiling() else plan  # traced: a constant of the graph
    order = _forced_path or choose("conv" if is_conv else "linear", n_in, n_out, a, b, c, d, k, training,
                                   x.element_size(), dev, fold)
    if order.startswith("fold-") and not (fold and training):
        order = order.removeprefix("fold-")
    if order == "rebuild":
        return None
    if is_conv and order.endswith("tok"):  # the token-major order exists for linear layers only
        order = order.removesuffix("tok") + "in"
    if w1.dtype != x.dtype:
        w1 = w1.to(x.dtype)
    if scale is not None and not (isinstance(scale, (int, float)) and scale == 1):
        w1 = w1 * scale
    w2 = make_w2(t, b, d, kernel)
    if w2.dtype != x.dtype:
        w2 = w2.to(x.dtype)
    if order.startswith("fold-"):
        update = kron(w1.detach(), w2.detach()).reshape(base.weight.shape)
        if is_conv:
            return FoldedUpdate(update, lambda y, keep=None: kron_conv2d_grads(
                y, x, w1 if keep is None else w1 * keep, w2, base.stride, base.padding, base.dilation))
        return FoldedUpdate(update, lambda y, keep=None: kron_linear_grads(
            y, x, w1 if keep is None else w1 * keep, w2, order.removeprefix("fold-")))
    if is_conv:
        return kron_conv2d(x, w1, w2, base.stride, base.padding, base.dilation, order)
    return kron_linear(x, w1, w2, order)

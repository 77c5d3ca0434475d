"""Factored Kronecker products on activations, with hand-written backward passes.

LoKr's update is dW = kron(w1, w2), w1 (a, c) small, w2 (b, d[, kh, kw]) big. Applied to an
input whose features are viewed as (c, d) it is ``Y = w1 X w2^T`` per token: two small
contractions instead of one full-size matrix product, and no full-size weight gradient.

The difficulty is memory traffic, not arithmetic: one of the two contractions always runs over
the *middle* axis of the (tokens, c, d) layout. These functions pick layouts so that every step
is a single BLAS call on strided views (``bmm`` with strided operands or outputs, one flat
``mm`` with a short inner dimension) and at most one transposing copy is made per direction.
The backward passes save only the input (which every adapter must keep to compute its factor
gradients; order "in" keeps it regrouped, shared by layers that read the same tensor) and
recompute the cheap intermediates instead of storing them (one small product more per layer
and step, for about one input-sized tensor less per layer).

Orders (all give the same result; ``lokr.plan`` picks one per layer from the shapes):

* ``"in"``: mix the c input groups with w1 first (on the input side), then apply w2;
* ``"out"``: apply w2 first, then mix with w1 on the output side;
* ``"tok"`` (linear only): token-major, the w1 mix as a batch of small per-token products and
  w2 as one flat product; no transposing copy at all, which pays off when the output side is
  large (the GEGLU projection).

Convolutions use NCHW, where both contractions are plain batched matrix products over large
matrices; the k x k kernel of w2 runs as one convolution over the c (or a) groups, stacked
along the batch axis.

Under torch.compile both functions run as plain differentiable tensor operations in the same
order instead: the compiler derives the backward pass and plans its memory itself, and the
shared-input cache (a module global, updated as a side effect) has no place in a graph.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

__all__ = ["kron_conv2d", "kron_conv2d_grads", "kron_linear", "kron_linear_grads"]


# ------------------------------------------------------------------------------------------
# Linear: x (N, c*d) -> y (N, a*b)
# ------------------------------------------------------------------------------------------

# The regrouped input of the last call. Attention's to_q, to_k and to_v read the same tensor with
# the same grouping: the transposing copy is made once and the three backward passes share it.
# Each layer flattens its input to 2-D, a new view object per call, so the cache is keyed on the
# tensor the view was taken of, with the view's geometry.
_regrouped: tuple = (None, -1, None, None)  # (weakref to the viewed tensor, its _version, geometry, xc)


def _regroup(x: torch.Tensor, c: int, d: int) -> torch.Tensor:
    """x (N, c*d) as (c, N, d), contiguous; reused while x views the same unmodified tensor the same way.
    Under torch.compile always a fresh copy: a module-global cache has no place in a graph."""
    global _regrouped
    if torch.compiler.is_compiling():
        return x.view(-1, c, d).transpose(0, 1).contiguous()
    root = x if x._base is None else x._base
    geometry = (tuple(x.shape), x.stride(), x.storage_offset(), x.dtype, c, d)
    ref, version, geometry0, xc = _regrouped
    if ref is not None and ref() is root and version == x._version and geometry0 == geometry:
        return xc
    xc = x.view(-1, c, d).transpose(0, 1).contiguous()  # the one transposing copy
    _regrouped = (weakref.ref(root), x._version, geometry, xc)
    return xc


def _linear_fwd_in(x, w1, w2):
    """(y, xc, z): w1 mixes the regrouped input (c, N, d) -> z (a, N, d), then one bmm with w2
    writes y straight into its (N, a, b) layout."""
    n = x.shape[0]
    a, c = w1.shape
    b, d = w2.shape
    xc = _regroup(x, c, d)
    z = torch.mm(w1, xc.view(c, n * d)).view(a, n, d)
    y = torch.empty(n, a * b, dtype=x.dtype, device=x.device)
    torch.bmm(z, w2.t().expand(a, d, b), out=y.view(n, a, b).transpose(0, 1))  # strided output, no copy
    return y, xc, z


def _linear_fwd_out(x, w1, w2):
    """(y, t): w2 contracts the strided (c, N, d) view of x -> t (c, N, b), w1 mixes, one copy."""
    n = x.shape[0]
    a, c = w1.shape
    b, d = w2.shape
    t = torch.bmm(x.view(n, c, d).transpose(0, 1), w2.t().expand(c, d, b))  # strided input, no copy
    yt = torch.mm(w1, t.view(c, n * b)).view(a, n, b)
    return yt.transpose(0, 1).contiguous().view(n, a * b), t  # the one transposing copy


def _linear_fwd_tok(x, w1, w2):
    """(y, z): token-major. w1 mixes each token's (c, d) block as a batch of small products
    -> z (N, a, d), then one flat product with w2 gives y in its (N, a, b) layout. No copies,
    but the small batched products run below BLAS's best speed."""
    n = x.shape[0]
    a, c = w1.shape
    b, d = w2.shape
    z = torch.bmm(w1.expand(n, a, c), x.view(n, c, d))
    return torch.mm(z.view(n * a, d), w2.t()).view(n, a * b), z


class _KronLinear(torch.autograd.Function):
    """y = (w1 (x) w2) x for a 2-D x (N, c*d).

    Order "in" keeps the regrouped input (c, N, d) instead of x (same size; x itself is then
    usually freed); orders "out" and "tok" keep x. The intermediates (the mixed input z, or
    t = x w2^T) are recomputed in backward (one extra small product) instead of stored.
    """

    @staticmethod
    def forward(ctx, x, w1, w2, order):
        ctx.order = order
        if order == "in":
            y, xc, _ = _linear_fwd_in(x, w1, w2)
            ctx.save_for_backward(xc, w1, w2)
        elif order == "tok":
            y, _ = _linear_fwd_tok(x, w1, w2)
            ctx.save_for_backward(x, w1, w2)
        else:
            y, _ = _linear_fwd_out(x, w1, w2)
            ctx.save_for_backward(x, w1, w2)
        return y

    @staticmethod
    def backward(ctx, g):
        saved, w1, w2 = ctx.saved_tensors
        return (*_linear_backward(ctx.order, saved, w1, w2, g, *ctx.needs_input_grad[:3]), None)


def _linear_backward(order, saved, w1, w2, g, need_x, need_w1, need_w2):
    """(gx, gw1, gw2) of y = (w1 (x) w2) x from the output gradient g (N, a*b); `saved` is the
    regrouped input (c, N, d) for order "in", else x (N, c*d). Plain tensor operations, so
    torch.compile traces it too (as the backward of _KronLinearGrads)."""
    a, c = w1.shape
    b, d = w2.shape
    g = g.contiguous()
    gx = gw1 = gw2 = None
    if order == "in":
        xc = saved  # (c, N, d)
        n = xc.shape[1]
        gt = g.view(n, a, b).transpose(0, 1)  # (a, N, b) strided view
        if need_w2:
            z = torch.mm(w1, xc.view(c, n * d)).view(a, n, d)
            gw2 = torch.bmm(gt.transpose(1, 2), z).sum(0)
        if need_w1 or need_x:
            gz = torch.bmm(gt, w2.expand(a, b, d)).view(a, n * d)  # (a, N, d)
            if need_w1:
                gw1 = torch.mm(gz, xc.view(c, n * d).t())
            if need_x:
                gx = torch.mm(w1.t(), gz).view(c, n, d).transpose(0, 1).reshape(n, c * d)
    elif order == "tok":
        x = saved
        n = x.shape[0]
        x3 = x.view(n, c, d)
        g2 = g.view(n * a, b)
        if need_w2:
            z = torch.bmm(w1.expand(n, a, c), x3)
            gw2 = torch.mm(g2.t(), z.view(n * a, d))
        if need_w1 or need_x:
            gz = torch.mm(g2, w2).view(n, a, d)
            if need_w1:
                gw1 = torch.bmm(gz, x3.transpose(1, 2)).sum(0)
            if need_x:
                gx = torch.bmm(w1.t().expand(n, c, a), gz).view(n, c * d)
    else:
        x = saved
        n = x.shape[0]
        xt = x.view(n, c, d).transpose(0, 1)  # (c, N, d) strided view
        gc = g.view(n, a, b).transpose(0, 1).contiguous().view(a, n * b)  # (a, N, b)
        if need_w1:
            t = torch.bmm(xt, w2.t().expand(c, d, b))
            gw1 = torch.mm(gc, t.view(c, n * b).t())
        if need_x or need_w2:
            gtt = torch.mm(w1.t(), gc).view(c, n, b)
            if need_w2:
                gw2 = torch.bmm(gtt.transpose(1, 2), xt).sum(0)
            if need_x:
                gx = torch.empty(n, c * d, dtype=x.dtype, device=x.device)
                torch.bmm(gtt, w2.expand(c, b, d), out=gx.view(n, c, d).transpose(0, 1))
    return gx, gw1, gw2


class _KronLinearGrads(torch.autograd.Function):
    """Identity on y, the output of a linear layer that ran with W + kron(w1, w2) in its weight,
    the update detached. Its backward gives w1 and w2 the gradients of that product from the
    activations, so the full-size weight gradient (N x out x in multiply-adds) is never formed;
    x's gradient comes from the layer's own product with W + dW, as for the frozen layer."""

    @staticmethod
    def forward(ctx, y, x, w1, w2, order):
        ctx.order = order
        c, d = w1.shape[1], w2.shape[1]
        saved = _regroup(x, c, d) if order == "in" else x  # the regrouped copy shared by q/k/v (eager)
        ctx.save_for_backward(saved, w1, w2)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        saved, w1, w2 = ctx.saved_tensors
        _, gw1, gw2 = _linear_backward(ctx.order, saved, w1, w2, g, False, *ctx.needs_input_grad[2:4])
        return g, None, gw1, gw2, None


def _linear_traced(x, w1, w2, order):
    """y for a 2-D x as plain matmuls (for torch.compile), in the eager orders' layouts: "in"
    regroups x to (c, N*d) so the w1 mix is one flat product (the compiler fuses the closing
    transpose into the add that follows), "out" and "tok" let the w1 mix run as a batch of small
    products, which measured as fast or faster there."""
    n = x.shape[0]
    a, c = w1.shape
    b, d = w2.shape
    x3 = x.view(n, c, d)
    if order == "in":
        z = torch.mm(w1, x3.transpose(0, 1).reshape(c, n * d)).view(a, n, d)
        return torch.matmul(z, w2.t()).transpose(0, 1).reshape(n, a * b)  # (a, N, b) -> (N, a*b)
    if order == "out":
        y = torch.matmul(w1, torch.matmul(x3, w2.t()))  # (n, c, b) -> (n, a, b)
    else:
        y = torch.matmul(torch.matmul(w1, x3), w2.t())  # (n, a, d) -> (n, a, b)
    return y.reshape(n, a * b)


def kron_linear(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, order: str = "in") -> torch.Tensor:
    """(w1 (x) w2) applied to the last axis of x, as F.linear(x, kron(w1, w2)) without forming it.

    `w1` (a, c), `w2` (b, d) with x.shape[-1] == c*d; returns (..., a*b). All three must share
    a dtype. `order` is "in" (mix with w1 on the input side first) or "out".
    """
    x2 = x.reshape(-1, x.shape[-1])
    if torch.compiler.is_compiling():
        y = _linear_traced(x2, w1, w2, order)
        return y.view(*x.shape[:-1], y.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if torch.is_grad_enabled() and (x2.requires_grad or w1.requires_grad or w2.requires_grad):
        y = _KronLinear.apply(x2, w1, w2, order)
    else:
        fwd = {"in": _linear_fwd_in, "out": _linear_fwd_out, "tok": _linear_fwd_tok}[order]
        y = fwd(x2, w1, w2)[0]
    return y.view(*x.shape[:-1], y.shape[-1])


def kron_linear_grads(y: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                      order: str = "in") -> torch.Tensor:
    """y unchanged, with w1 and w2 given the gradients of F.linear(x, kron(w1, w2)) in backward.

    For a layer that ran with kron(w1, w2) added (detached) to its weight: y = F.linear(x, W + dW)
    already holds the update's output and x's gradient, and only the factors' gradients are
    missing, which this computes from x and y's gradient in `order` ("in" or "tok", as
    `kron_linear`) at the cost of the factored backward pass without its input gradient.
    """
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    return _KronLinearGrads.apply(y, x2, w1, w2, order)  # x gets no gradient here (backward returns None)


# ------------------------------------------------------------------------------------------
# Conv2d (NCHW): x (n, c*d, H, W) -> y (n, a*b, H', W'); w2 (b, d, kh, kw)
# ------------------------------------------------------------------------------------------

def _lmul(w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """w (p, q) @ t (B, q, L) -> (B, p, L) as one bmm with a broadcast w.

    torch.matmul folds this case into a single mm on transposed copies of t and of the result;
    bmm with a stride-0 batch reads t in place.
    """
    return torch.bmm(w.unsqueeze(0).expand(t.shape[0], *w.shape), t)

def _is_pointwise(w2: torch.Tensor, geom) -> bool:
    stride, padding, _ = geom
    return tuple(w2.shape[2:]) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0)


def _conv(x4: torch.Tensor, w2: torch.Tensor, geom) -> torch.Tensor:
    """w2 applied to a (batch, d, H, W) stack: a plain conv, or a batched matmul for 1x1."""
    if _is_pointwise(w2, geom):
        bt, d, h, w = x4.shape
        return _lmul(w2.view(w2.shape[0], d), x4.view(bt, d, h * w)).view(bt, -1, h, w)
    stride, padding, dilation = geom
    return F.conv2d(x4, w2, None, stride, padding, dilation)


def _conv_backward(g4, x4, w2, geom, need_x, need_w):
    """Gradients of _conv w.r.t. its input stack and w2."""
    if _is_pointwise(w2, geom):
        bt, b, h, w = g4.shape
        d = x4.shape[1]
        g3 = g4.reshape(bt, b, h * w)
        w2m = w2.view(b, d)
        gx = _lmul(w2m.t(), g3).view(bt, d, h, w) if need_x else None
        gw = torch.bmm(g3, x4.reshape(bt, d, h * w).transpose(1, 2)).sum(0).view_as(w2) if need_w else None
        return gx, gw
    stride, padding, dilation = geom
    gx, gw, _ = torch.ops.aten.convolution_backward(
        g4, x4, w2, None, list(stride), list(padding), list(dilation), False, [0, 0], 1, [need_x, need_w, False])
    return gx, gw


def _mix(w: torch.Tensor, t: torch.Tensor, groups_in: int) -> torch.Tensor:
    """w (a, c) applied to the channel groups of t (n, c*k, ...): (n, a*k, ...), one batched matmul."""
    n = t.shape[0]
    return _lmul(w, t.reshape(n, groups_in, -1)).view(n, -1, *t.shape[2:])


def _conv_fwd(x, w1, w2, geom, order):
    n, _, h, w = x.shape
    a, c = w1.shape
    d = w2.shape[1]
    if order == "in":
        z = _mix(w1, x, c)  # (n, a*d, H, W)
        y = _conv(z.view(n * a, d, h, w), w2, geom)
        return y.reshape(n, -1, *y.shape[2:]), None
    t = _conv(x.view(n * c, d, h, w), w2, geom)  # (n*c, b, H', W')
    return _mix(w1, t.view(n, -1, *t.shape[2:]), c), t


class _KronConv(torch.autograd.Function):
    """y = conv2d(x, kron(w1, w2)) without forming it (NCHW, groups == 1)."""

    @staticmethod
    def forward(ctx, x, w1, w2, geom, order):
        y, t = _conv_fwd(x, w1, w2, geom, order)
        ctx.geom, ctx.order = geom, order
        # "out" order with a k x k kernel: its intermediate is a convolution, worth keeping;
        # everything else is one cheap mix and is recomputed in backward.
        keep = t is not None and not _is_pointwise(w2, geom)
        ctx.save_for_backward(x, w1, w2, t if keep else None)
        return y

    @staticmethod
    def backward(ctx, g):
        x, w1, w2, t = ctx.saved_tensors
        return (*_conv_backward_all(ctx.order, x, w1, w2, t, g, ctx.geom, *ctx.needs_input_grad[:3]), None, None)


def _conv_backward_all(order, x, w1, w2, t, g, geom, need_x, need_w1, need_w2):
    """(gx, gw1, gw2) of y = conv2d(x, kron(w1, w2)) from the output gradient g; `t` is order
    "out"'s kept intermediate or None (recomputed). Plain tensor operations, so torch.compile
    traces it too (as the backward of _KronConvGrads)."""
    n, _, h, w = x.shape
    a, c = w1.shape
    b, d = w2.shape[:2]
    g = g.contiguous()
    gx = gw1 = gw2 = None
    if order == "in":
        z = _mix(w1, x, c).view(n * a, d, h, w)
        gz, gw2 = _conv_backward(g.view(n * a, b, *g.shape[2:]), z, w2, geom, need_x or need_w1, need_w2)
        if gz is not None:
            gz3 = gz.view(n, a, -1)
            if need_w1:
                gw1 = torch.bmm(gz3, x.view(n, c, -1).transpose(1, 2)).sum(0)
            if need_x:
                gx = _lmul(w1.t(), gz3).view_as(x)
    else:
        g3 = g.view(n, a, -1)
        if need_w1:
            if t is None:
                t = _conv(x.view(n * c, d, h, w), w2, geom)
            gw1 = torch.bmm(g3, t.reshape(n, c, -1).transpose(1, 2)).sum(0)
        if need_x or need_w2:
            gt = _lmul(w1.t(), g3)  # (n, c, b*H'*W')
            gx4, gw2 = _conv_backward(gt.view(n * c, b, *g.shape[2:]), x.view(n * c, d, h, w), w2, geom,
                                      need_x, need_w2)
            gx = gx4.view_as(x) if gx4 is not None else None
    return gx, gw1, gw2


class _KronConvGrads(torch.autograd.Function):
    """Identity on y, the output of a conv that ran with W + kron(w1, w2) in its weight, the
    update detached: the conv counterpart of _KronLinearGrads (order "in")."""

    @staticmethod
    def forward(ctx, y, x, w1, w2, geom):
        ctx.geom = geom
        ctx.save_for_backward(x, w1, w2)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        x, w1, w2 = ctx.saved_tensors
        _, gw1, gw2 = _conv_backward_all("in", x, w1, w2, None, g, ctx.geom, False, *ctx.needs_input_grad[2:4])
        return g, None, gw1, gw2, None


def kron_conv2d(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, stride=(1, 1), padding=(0, 0),
                dilation=(1, 1), order: str = "in") -> torch.Tensor:
    """conv2d(x, kron(w1, w2)) (no bias, groups 1) without forming the kernel.

    `w1` (a, c), `w2` (b, d, kh, kw) with x.shape[1] == c*d. NCHW; a channels-last 1x1 input
    runs through the linear path so its layout is kept.
    """
    geom = (tuple(stride), tuple(padding), tuple(dilation))
    w1, w2 = w1.contiguous(), w2.contiguous()  # a permuted w2 (a Tucker rebuild) would steer conv2d to NHWC
    if (_is_pointwise(w2, geom) and x.dim() == 4 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)):
        y = kron_linear(x.permute(0, 2, 3, 1), w1, w2.view(w2.shape[0], w2.shape[1]), order)
        return y.permute(0, 3, 1, 2)
    if not x.is_contiguous():
        x = x.contiguous()
    if torch.compiler.is_compiling():  # the same operations, differentiated by the compiler
        return _conv_fwd(x, w1, w2, geom, order)[0]
    if torch.is_grad_enabled() and (x.requires_grad or w1.requires_grad or w2.requires_grad):
        return _KronConv.apply(x, w1, w2, geom, order)
    return _conv_fwd(x, w1, w2, geom, order)[0]


def kron_conv2d_grads(y: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, stride=(1, 1),
                      padding=(0, 0), dilation=(1, 1)) -> torch.Tensor:
    """y unchanged, with w1 and w2 given the gradients of conv2d(x, kron(w1, w2)) in backward:
    `kron_linear_grads` for a conv (NCHW, groups 1) that ran with the update in its weight."""
    geom = (tuple(stride), tuple(padding), tuple(dilation))
    x = x if x.is_contiguous() else x.contiguous()
    return _KronConvGrads.apply(y, x, w1.contiguous(), w2.contiguous(), geom)

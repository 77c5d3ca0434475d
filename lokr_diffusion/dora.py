"""DoRA (weight decomposition, LyCORIS `weight_decompose`, file tensor `dora_scale`) as pure functions.

A DoRA module stores a magnitude vector m next to its factors. With W the frozen weight and
D = scale * dW the module's scaled update, the patched weight is

    W' = (W + D) * m / (||W + D|| + eps)

where the norm is taken per output row (m of shape (out, 1[, 1, 1]), LyCORIS's default
`wd_on_out`) or per input column (m of shape (1, in[, 1, 1])), over everything else
(the kernel included), and eps is float32's machine epsilon. This is LyCORIS 4.1.3's forward
at multiplier 1; the norm is not detached, so training differentiates through it as LyCORIS
does. A multiplier lambda scales the resulting change, W + lambda * (W' - W), as ComfyUI and
AUTOMATIC1111 apply a strength (docs/toolbox.md compares the tools).
"""
from __future__ import annotations

import torch

EPS = torch.finfo(torch.float32).eps


def on_output_axis(magnitude_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> bool:
    """Whether a `dora_scale` of this shape holds one magnitude per output row (else per input column).

    Raises ValueError for a shape that is neither (out, 1, ...) nor (1, in, ...) of the weight.
    """
    ones = (1,) * (len(weight_shape) - 2)
    if tuple(magnitude_shape) == (weight_shape[0], 1, *ones):
        return True
    if tuple(magnitude_shape) == (1, weight_shape[1], *ones):
        return False
    raise ValueError(f"DoRA magnitude dora_scale of shape {tuple(magnitude_shape)} fits neither the output axis "
                     f"{(weight_shape[0], 1, *ones)} nor the input axis {(1, weight_shape[1], *ones)} "
                     f"of a weight {tuple(weight_shape)}")


def axis_norm(weight: torch.Tensor, out_axis: bool = True) -> torch.Tensor:
    """||weight|| per output row (shape (out, 1, ...)) or per input column (shape (1, in, ...))."""
    if out_axis:
        return weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    cols = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
    return cols.reshape(1, weight.shape[1], *[1] * (weight.dim() - 2))


def init_magnitude(weight: torch.Tensor) -> torch.Tensor:
    """The initial `dora_scale`: the base weight's row norms in float32, so W' = W at the start
    (up to eps), the shape LyCORIS writes by default."""
    return axis_norm(weight.detach().float(), out_axis=True)


def decomposed_weight(weight: torch.Tensor, update: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """W' = (W + D) * m / (||W + D|| + eps), the norm on the axis `magnitude`'s shape names."""
    merged = weight + update
    norm = axis_norm(merged, on_axis_of(magnitude, merged)) + EPS
    return merged * (magnitude.to(merged.dtype) / norm)


def decomposed_delta(weight: torch.Tensor, update: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """W' - W: what a DoRA module adds to the layer's weight at multiplier 1."""
    return decomposed_weight(weight, update, magnitude) - weight


def on_axis_of(magnitude: torch.Tensor, weight: torch.Tensor) -> bool:
    return on_output_axis(tuple(magnitude.shape), tuple(weight.shape))


# -- the factored training path ------------------------------------------------------------------
#
# Per output row i, ||W_i + D_i||^2 = ||W_i||^2 + 2 <W_i, D_i> + ||D_i||^2, and for LoKr and LoRA
# the last two terms contract W and the factors without forming D. With g = m / (||W + D|| + eps)
# per output channel, the layer's change is (W' - W) x = (g - 1) * (W x) + g * (D x): W x is the
# frozen layer's own output (less its bias) and D x the algorithm's factored product, so training
# never builds D nor multiplies the activations by a full-size weight.


def update_row_terms(algo_name: str, factors: dict[str, torch.Tensor],
                     weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(<W_i, dW_i>, ||dW_i||^2) per output row for the unscaled update dW of the factors, without
    forming dW; None where no such form is implemented (LoHa, a LoRA with a Tucker mid)."""
    from .algos import lokr

    out_dim = weight.shape[0]
    if algo_name == "lokr":
        w1 = lokr.make_w1(factors)
        a, c = w1.shape
        b, d = out_dim // a, weight.shape[1] // c
        kernel = tuple(weight.shape[2:])
        w2 = lokr.make_w2(factors, b, d, kernel).reshape(b, d, -1)  # (b, d, kh*kw)
        w5 = weight.reshape(a, b, c, d, w2.shape[2])  # row p*b + j, column q*d + r: kron's layout
        inner = (torch.einsum("pjqrk,jrk->pjq", w5, w2) * w1[:, None, :]).sum(-1)
        sq = w1.pow(2).sum(1)[:, None] * w2.pow(2).flatten(1).sum(1)[None, :]
        return inner.reshape(out_dim), sq.reshape(out_dim)
    if algo_name == "lora" and "lora_mid.weight" not in factors:
        up, down = factors["lora_up.weight"].flatten(1), factors["lora_down.weight"].flatten(1)
        projected = weight.flatten(1) @ down.t()  # (out, r)
        return (up * projected).sum(1), ((up @ (down @ down.t())) * up).sum(1)
    return None


def row_gain(weight: torch.Tensor, inner: torch.Tensor, sq: torch.Tensor, scale: float,
             magnitude: torch.Tensor) -> torch.Tensor:
    """g = m / (||W + scale * dW|| + eps) per output row, from the row terms (a vector of `out`)."""
    w_sq = weight.flatten(1).pow(2).sum(1)
    norm = (w_sq + (2 * scale) * inner + (scale * scale) * sq).clamp_min(0).sqrt() + EPS
    return magnitude.reshape(-1).to(norm.dtype) / norm


def factored_change(base_wx: torch.Tensor, update_x: torch.Tensor, gain: torch.Tensor,
                    conv: bool) -> torch.Tensor:
    """(W' - W) x = (g - 1) * (W x) + g * (D x), the gain broadcast over the channel axis."""
    g = gain.view(1, -1, *([1] * (base_wx.dim() - 2))) if conv else gain
    return (g - 1) * base_wx + g * update_x


__all__ = ["EPS", "axis_norm", "decomposed_delta", "decomposed_weight", "factored_change", "init_magnitude",
           "on_output_axis", "row_gain", "update_row_terms"]

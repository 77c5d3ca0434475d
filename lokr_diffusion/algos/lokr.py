"""LoKr: dW = kron(w1, w2), w1 small (a, c), w2 big (b, d[, kh, kw]), either optionally low-rank."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kron import factorization, kron
from .common import ModuleSettings, kaiming_, weight_dims

NAME = "lokr"
TENSOR_NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def detect(names: set[str]) -> bool:
    return bool(names & {"lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a"})


def factor_shapes(weight_shape: tuple[int, ...], factor: int) -> tuple[int, int, int, int]:
    """(a, b, c, d): out = a*b, in = c*d, the split every file tensor shape follows."""
    out_dim, in_dim, _ = weight_dims(weight_shape)
    a, b = factorization(out_dim, factor)
    c, d = factorization(in_dim, factor)
    return a, b, c, d


def init_tensors(weight_shape: tuple[int, ...], s: ModuleSettings) -> dict[str, torch.Tensor]:
    """LyCORIS initialisation: w2 (or w2_b) zero, the rest Kaiming, so dW starts at exactly 0."""
    _, _, kernel = weight_dims(weight_shape)
    a, b, c, d = factor_shapes(weight_shape, s.factor)
    k = 1
    for size in kernel:
        k *= size
    r = s.dim
    t: dict[str, torch.Tensor] = {}
    if s.decompose_both and not s.full_matrix and r < max(a, c) / 2:
        t["lokr_w1_a"] = kaiming_(torch.empty(a, r))
        t["lokr_w1_b"] = kaiming_(torch.empty(r, c))
    else:
        t["lokr_w1"] = kaiming_(torch.empty(a, c))
    if not s.full_matrix and r < max(b, d) / 2:
        t["lokr_w2_a"] = kaiming_(torch.empty(b, r))
        t["lokr_w2_b"] = torch.zeros(r, d * k)
    else:
        t["lokr_w2"] = torch.zeros(b, d, *kernel)
    return t


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


def delta_weight(t: dict[str, torch.Tensor], weight_shape: tuple[int, ...]) -> torch.Tensor:
    out_dim, in_dim, kernel = weight_dims(weight_shape)
    w1 = make_w1(t)
    a, c = w1.shape
    if out_dim % a or in_dim % c:
        raise ValueError(f"w1 of shape {tuple(w1.shape)} does not divide the weight {tuple(weight_shape)}")
    w2 = make_w2(t, out_dim // a, in_dim // c, kernel)
    return kron(w1, w2).reshape(weight_shape)


def rank(t: dict[str, torch.Tensor]) -> int | None:
    """The rank behind alpha / r: w2's if it is decomposed, else w1's; None (scale 1) if both full."""
    if "lokr_w2_b" in t:
        return int(t["lokr_w2_b"].shape[0])
    if "lokr_w1_b" in t:
        return int(t["lokr_w1_b"].shape[0])
    return None


def forward(x: torch.Tensor, t: dict[str, torch.Tensor], base: nn.Module) -> torch.Tensor | None:
    """kron(w1, w2) applied without forming it: (w1 (x) w2) vec(X) = vec(w1 X w2^T).

    Linear: the input features are viewed as (c, d); w2 contracts d, w1 mixes c. Conv: the c
    groups of d channels run through w2's kernel as one batched conv, then w1 mixes the groups
    like a 1x1 conv. The backward pass then only ever touches the small factors. Returns None
    where rebuilding dW is cheaper (few tokens, see `factored_is_cheaper`).
    """
    weight_shape = tuple(base.weight.shape)
    out_dim, in_dim, kernel = weight_dims(weight_shape)
    w1 = make_w1(t)
    a, c = w1.shape
    b, d = out_dim // a, in_dim // c
    if isinstance(base, nn.Conv2d):
        if base.groups != 1:
            return None
        n, _, h, w = x.shape
        y = F.conv2d(x.reshape(n * c, d, h, w), make_w2(t, b, d, kernel).to(x.dtype), None,
                     base.stride, base.padding, base.dilation)
        y = y.reshape(n, c, b, *y.shape[-2:])
        return torch.einsum("ip,npbhw->nibhw", w1.to(x.dtype), y).reshape(n, a * b, *y.shape[-2:])
    tokens = x.numel() // in_dim
    if not factored_is_cheaper(tokens, a, b, c, d, t):
        return None
    xs = x.reshape(*x.shape[:-1], c, d)
    if "lokr_w2_a" in t and "lokr_t2" not in t and t["lokr_w2_b"].dim() == 2:
        h = (xs @ t["lokr_w2_b"].to(x.dtype).T) @ t["lokr_w2_a"].to(x.dtype).T  # (..., c, b)
    else:
        h = xs @ make_w2(t, b, d, ()).to(x.dtype).T
    y = w1.to(x.dtype) @ h  # (..., a, b)
    return y.reshape(*x.shape[:-1], a * b)


def factored_is_cheaper(tokens: int, a: int, b: int, c: int, d: int, t: dict[str, torch.Tensor]) -> bool:
    """Multiply-add count of the factored path against rebuilding dW and one full matmul.

    Factored: tokens * (c*d*b [or via rank r] + a*c*b). Rebuild: a*b*c*d to form dW plus
    tokens * a*b*c*d to apply it. The factored path wins unless a or d is 1 (no real factoring)
    or there are only a handful of tokens.
    """
    r = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else None
    w2_cost = c * r * (d + b) if r is not None else c * d * b
    factored = tokens * (w2_cost + a * c * b)
    rebuild = a * b * c * d * (tokens + 1)
    return factored < rebuild

"""Kronecker-product math: factorization and the product itself, as pure functions.

LoKr stores dW = kron(w1, w2) with w1 (a, c) small and w2 (b, d) big, where
out = a*b and in = c*d. For convolutions w2 also carries the kernel, w1 is broadcast over it:
dW[i*b + j, p*d + q, s, t] = w1[i, p] * w2[j, q, s, t].
"""
from __future__ import annotations

import torch


def factorization(dim: int, factor: int = -1) -> tuple[int, int]:
    """Split `dim` into (small, large) with small * large == dim, the way LyCORIS does.

    The split decides every tensor shape in a file, so it must match the other tools exactly:
    with `factor` > 0 dividing `dim` the pair is (factor, dim // factor), smaller first;
    otherwise the divisor pair closest to sqrt(dim) whose small side is <= factor
    (factor < 0: no limit).
    """
    if dim <= 0:
        raise ValueError(f"factorization: dim must be positive, got {dim}")
    if factor == 0:
        raise ValueError("factorization: factor 0 is meaningless; use -1 (balanced) or a positive divisor")
    if factor > 0 and dim % factor == 0:
        m, n = factor, dim // factor
        return (m, n) if m <= n else (n, m)
    if factor < 0:
        factor = dim
    m, n = 1, dim
    length = m + n
    while m < n:
        new_m = m + 1
        while dim % new_m != 0:
            new_m += 1
        new_n = dim // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
        length = m + n
    return (m, n) if m <= n else (n, m)


def kron(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """kron(w1, w2) for a 2-D w1 and a 2-D (linear) or 4-D (conv) w2, vectorised.

    Equals torch.kron(w1, w2) (after unsqueezing w1 for convs) but as one broadcasted product,
    which avoids torch.kron's generic reshape dance on big conv kernels.
    """
    a, c = w1.shape
    b, d = w2.shape[:2]
    kernel = w2.shape[2:]
    # (a, 1, c, 1, *k) * (1, b, 1, d, *k) -> (a, b, c, d, *k) -> (a*b, c*d, *k)
    w1v = w1.reshape(a, 1, c, 1, *([1] * len(kernel)))
    w2v = w2.reshape(1, b, 1, d, *kernel)
    return (w1v * w2v).reshape(a * b, c * d, *kernel)

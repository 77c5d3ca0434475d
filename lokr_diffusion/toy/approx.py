"""How well can each adapter shape represent a given weight update? Best fits, per method.

For a weight difference dW (out x in) and a method's shape, find the factors whose update is
closest to dW in the Frobenius norm, then report the relative error ||dW - fit|| / ||dW||.

* LoRA, rank r: truncated SVD, the exact optimum (Eckart-Young).
* LoKr with both factors full: the nearest Kronecker product, exact: rearranging dW so that
  kron(w1, w2) becomes the outer product vec(w1) vec(w2)^T turns it into a rank-1 SVD
  (Van Loan and Pitsianis).
* LoKr with a low-rank w2: alternating least squares on that rearrangement; for a fixed w1 the
  best rank-r w2 is a truncated SVD, for a fixed w2 the best w1 is a projection. A local optimum.
* LoHa, rank r: no closed form; Adam from an initialisation that already equals the rank-r
  SVD (the second factor starts as the all-ones matrix, which is rank 1), so the fit is never
  worse than LoRA of the same rank. A local optimum.

The updates are rebuilt with the algorithms' own `delta_weight`, so what is measured is exactly
what a file with these tensors would apply.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..algos import loha, lokr, lora
from ..kron import factorization

__all__ = ["Fit", "fit_loha", "fit_lokr", "fit_lora", "relative_error"]


@dataclass(frozen=True)
class Fit:
    method: str
    setting: str
    params: int
    delta: torch.Tensor


def relative_error(target: torch.Tensor, fit: torch.Tensor) -> float:
    return float(torch.linalg.norm(target - fit) / torch.linalg.norm(target).clamp_min(1e-30))


def _params(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in tensors.values())


def fit_lora(dw: torch.Tensor, rank: int) -> Fit:
    u, s, vh = torch.linalg.svd(dw.double(), full_matrices=False)
    r = min(rank, len(s))
    t = {"lora_up.weight": (u[:, :r] * s[:r]).float(), "lora_down.weight": vh[:r].float()}
    return Fit("lora", f"rank {rank}", _params(t), lora.delta_weight(t, tuple(dw.shape)))


def _rearrange(dw: torch.Tensor, a: int, c: int) -> torch.Tensor:
    """(a*b, c*d) -> (a*c, b*d) with kron(w1, w2) mapping to vec(w1) vec(w2)^T."""
    out_dim, in_dim = dw.shape
    b, d = out_dim // a, in_dim // c
    return dw.reshape(a, b, c, d).permute(0, 2, 1, 3).reshape(a * c, b * d)


def _truncate(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank]


def fit_lokr(dw: torch.Tensor, factor: int, rank: int | None = None, iters: int = 50) -> Fit:
    """`rank` None: w2 full; otherwise w2 = w2_a @ w2_b of that rank (LoKr's low-rank form)."""
    out_dim, in_dim = dw.shape
    a, b = factorization(out_dim, factor)
    c, d = factorization(in_dim, factor)
    r_mat = _rearrange(dw.double(), a, c)  # (a*c, b*d)
    u, s, vh = torch.linalg.svd(r_mat, full_matrices=False)
    w1 = (u[:, 0] * s[0]).reshape(a, c)
    w2 = vh[0].reshape(b, d)
    if rank is None or rank >= min(b, d):
        t = {"lokr_w1": w1.float(), "lokr_w2": w2.float()}
        setting = f"factor {factor}, full"
    else:
        for _ in range(iters):
            v = (r_mat.T @ w1.reshape(-1) / w1.pow(2).sum()).reshape(b, d)
            w2_a, w2_b = _truncate(v, rank)
            w2 = w2_a @ w2_b
            w1 = (r_mat @ w2.reshape(-1) / w2.pow(2).sum().clamp_min(1e-30)).reshape(a, c)
        t = {"lokr_w1": w1.float(), "lokr_w2_a": w2_a.float(), "lokr_w2_b": w2_b.float()}
        setting = f"factor {factor}, rank {rank}"
    return Fit("lokr", setting, _params(t), lokr.delta_weight(t, tuple(dw.shape)))


def fit_loha(dw: torch.Tensor, rank: int, steps: int = 600, lr: float = 0.01, seed: int = 0) -> Fit:
    """Fits dW scaled to unit RMS (so one learning rate suits every layer), then scales back."""
    rms = float(dw.double().pow(2).mean().sqrt().clamp_min(1e-30))
    target = dw.double() / rms
    u, s, vh = torch.linalg.svd(target, full_matrices=False)
    r = min(rank, len(s))
    g = torch.Generator().manual_seed(seed)
    w1_a = torch.zeros(dw.shape[0], rank, dtype=torch.float64)
    w1_b = torch.zeros(rank, dw.shape[1], dtype=torch.float64)
    w1_a[:, :r], w1_b[:r] = u[:, :r] * s[:r].sqrt(), vh[:r] * s[:r].sqrt()[:, None]
    w2_a = 1e-3 * torch.randn(dw.shape[0], rank, generator=g, dtype=torch.float64)
    w2_b = 1e-3 * torch.randn(rank, dw.shape[1], generator=g, dtype=torch.float64)
    w2_a[:, 0], w2_b[0] = 1.0, 1.0
    tensors = {"hada_w1_a": w1_a, "hada_w1_b": w1_b, "hada_w2_a": w2_a, "hada_w2_b": w2_b}
    for t in tensors.values():
        t.requires_grad_(True)
    opt = torch.optim.Adam(list(tensors.values()), lr=lr)
    best, best_t = float("inf"), None
    for step in range(steps + 1):
        loss = (loha.delta_weight(tensors, tuple(dw.shape)) - target).pow(2).mean()
        if step % 25 == 0 or step == steps:  # keep the best seen, so Adam's wobbles cannot lose the start
            if loss.item() < best:
                best, best_t = loss.item(), {k: v.detach().clone() for k, v in tensors.items()}
        if step == steps:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    best_t["hada_w1_a"] = best_t["hada_w1_a"] * rms  # the product is linear in each factor
    t = {k: v.float() for k, v in best_t.items()}
    return Fit("loha", f"rank {rank}", _params(t), loha.delta_weight(t, tuple(dw.shape)))

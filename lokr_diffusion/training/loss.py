"""The denoising objective: noise, timesteps, targets and the (min-SNR weighted) loss."""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr


def make_noise(latents: torch.Tensor, noise_offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise, plus a per-channel constant offset that lets the model learn very dark
    and very bright images (the offset noise trick)."""
    noise = torch.randn_like(latents)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1,
                                                   device=latents.device, dtype=latents.dtype)
    return noise


def sample_timesteps(batch: int, min_timestep: int, max_timestep: int, device: torch.device) -> torch.Tensor:
    return torch.randint(min_timestep, max_timestep, (batch,), device=device).long()


def target_for(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
               prediction_type: str) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {prediction_type!r}")


def diffusion_loss(model_pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, scheduler,
                   prediction_type: str, min_snr_gamma: float | None = None,
                   sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error in fp32; with min_snr_gamma, each sample weighted by
    min(SNR, gamma) / SNR (epsilon) or min(SNR, gamma) / (SNR + 1) (v-prediction), which stops
    the easy low-noise timesteps from dominating. `sample_weights` (B,) multiply each sample's
    loss before the mean: the prior-preservation weight of regularisation images."""
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma is not None:
        snr = compute_snr(scheduler, timesteps).float()
        clipped = torch.clamp(snr, max=min_snr_gamma)
        weights = clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr.clamp_min(1e-8)
        loss = loss * weights
    if sample_weights is not None:
        loss = loss * sample_weights.to(loss.device, loss.dtype)
    return loss.mean()


def denoising_loss(latents: torch.Tensor, denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   scheduler, prediction_type: str, *, noise_offset: float = 0.0, min_timestep: int = 0,
                   max_timestep: int | None = None, min_snr_gamma: float | None = None,
                   sample_weights: torch.Tensor | None = None) -> torch.Tensor:
    """One training step's loss: noise the latents at random timesteps, ask ``denoise(noisy,
    timesteps)`` for its prediction, compare with the target.

    The trainer, the toy model's pretraining and the method comparison all call this, so the
    random draws (noise, then timesteps) and the objective are the same everywhere.
    """
    with torch.no_grad():
        noise = make_noise(latents, noise_offset)
        high = max_timestep or scheduler.config.num_train_timesteps
        timesteps = sample_timesteps(latents.shape[0], min_timestep, high, latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = target_for(scheduler, latents, noise, timesteps, prediction_type)
    pred = denoise(noisy, timesteps)
    return diffusion_loss(pred, target, timesteps, scheduler, prediction_type, min_snr_gamma, sample_weights)

"""The training objectives: DDPM noise prediction (epsilon, v; min-SNR weighted) and rectified flow."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


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
        from diffusers.training_utils import compute_snr  # imported here: the config imports this module

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
                   sample_weights: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                   timesteps: torch.Tensor | None = None) -> torch.Tensor:
    """One training step's loss: noise the latents at random timesteps, ask ``denoise(noisy,
    timesteps)`` for its prediction, compare with the target.

    The trainer, the toy model's pretraining and the method comparison all call this, so the
    random draws (noise, then timesteps) and the objective are the same everywhere. Validation
    passes its own fixed `noise` and `timesteps`, which skips those draws.
    """
    with torch.no_grad():
        if noise is None:
            noise = make_noise(latents, noise_offset)
        if timesteps is None:
            high = max_timestep or scheduler.config.num_train_timesteps
            timesteps = sample_timesteps(latents.shape[0], min_timestep, high, latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = target_for(scheduler, latents, noise, timesteps, prediction_type)
    pred = denoise(noisy, timesteps)
    return diffusion_loss(pred, target, timesteps, scheduler, prediction_type, min_snr_gamma, sample_weights)


# -- rectified flow (Flux, SD3) -------------------------------------------------------------------

TIMESTEP_SAMPLING = ("uniform", "logit_normal", "mode", "cosmap")
FLOW_LOSS_WEIGHTING = ("none", "sigma_sqrt", "cosmap")


def sample_flow_positions(batch: int, sampling: str, *, logit_mean: float = 0.0, logit_std: float = 1.0,
                          mode_scale: float = 1.29, device: torch.device | str = "cpu") -> torch.Tensor:
    """Where on the path from data (0) to noise (1) each sample is trained, before the shift.

    ``uniform``, ``logit_normal`` and ``mode`` are Diffusers' SD3 densities; ``cosmap`` is the
    SD3 paper's CosMap, t = 1 - 1 / (tan(pi u / 2) + 1), which Diffusers samples uniformly.
    """
    from diffusers.training_utils import compute_density_for_timestep_sampling

    if sampling == "cosmap":
        u = torch.rand(batch, device=device)
        return 1 - 1 / (torch.tan(math.pi * u / 2) + 1)
    scheme = "none" if sampling == "uniform" else sampling
    return compute_density_for_timestep_sampling(scheme, batch, logit_mean=logit_mean, logit_std=logit_std,
                                                 mode_scale=mode_scale, device=device)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow-matching time shift s' = shift s / (1 + (shift - 1) s): more training at high noise
    for larger images. Flux's resolution-dependent shift is this with shift = exp(mu)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_matching_loss(latents: torch.Tensor, denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                       shift: float, *, sampling: str = "logit_normal", logit_mean: float = 0.0,
                       logit_std: float = 1.0, mode_scale: float = 1.29, weighting: str = "none",
                       noise_offset: float = 0.0, sample_weights: torch.Tensor | None = None,
                       noise: torch.Tensor | None = None, sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """One rectified-flow training step: x_s = (1 - s) x_0 + s e, the model predicts e - x_0.

    ``denoise(noisy, timesteps)`` gets timesteps s * 1000, the scale of Diffusers' flow-matching
    schedulers (the family's forward rescales if its denoiser wants [0, 1]). The draws are noise,
    then positions, as in :func:`denoising_loss`; validation passes fixed `noise` and `sigmas`
    (used as they are, no shift) instead.
    """
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    with torch.no_grad():
        if noise is None:
            noise = make_noise(latents, noise_offset)
        if sigmas is None:
            sigmas = shift_sigmas(sample_flow_positions(latents.shape[0], sampling, logit_mean=logit_mean,
                                                        logit_std=logit_std, mode_scale=mode_scale,
                                                        device=latents.device), shift)
        s = sigmas.view(-1, *([1] * (latents.dim() - 1)))
        noisy = (1 - s) * latents + s * noise
        target = noise - latents
    pred = denoise(noisy, sigmas * 1000)
    per_element = (pred.float() - target.float()) ** 2
    per_sample = per_element.reshape(latents.shape[0], -1).mean(dim=1)
    per_sample = per_sample * compute_loss_weighting_for_sd3("none" if weighting == "none" else weighting, sigmas)
    if sample_weights is not None:
        per_sample = per_sample * sample_weights.to(per_sample.device, per_sample.dtype)
    return per_sample.mean()

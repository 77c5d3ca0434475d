"""The training objectives: DDPM noise prediction (epsilon, v; min-SNR weighted) and rectified flow.

Both share the noise recipe (:class:`NoiseOptions`: offset noise, multires noise, input
perturbation) and the per-element loss (:class:`LossFunction`: L2, L1, Huber, smooth L1 with a
timestep-scheduled threshold). The option names and formulas are kohya sd-scripts', so a setup
brought from there trains the same objective.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_TYPES = ("l2", "huber", "smooth_l1", "l1")
HUBER_SCHEDULES = ("snr", "exponential", "constant")


@dataclass(frozen=True)
class NoiseOptions:
    """How the training noise is drawn and how the denoiser's input is perturbed.

    ``offset``: a per-channel constant added to the noise (offset noise: very dark and very
    bright images). ``multires_iterations`` / ``multires_discount``: pyramid noise, applied after
    the offset as kohya sd-scripts does. ``ip_gamma``: input perturbation (Ning et al. 2023): the
    noisy input is built from noise + gamma * extra noise while the target keeps the plain noise;
    with ``ip_random_strength`` gamma is drawn uniformly from [0, ip_gamma) each step.
    """

    offset: float = 0.0
    multires_iterations: int = 0
    multires_discount: float = 0.3
    ip_gamma: float = 0.0
    ip_random_strength: bool = False

    def draw(self, latents: torch.Tensor) -> torch.Tensor:
        """The noise the target is made of (plain Gaussian, plus offset and pyramid noise)."""
        noise = make_noise(latents, self.offset)
        if self.multires_iterations:
            noise = pyramid_noise(noise, self.multires_iterations, self.multires_discount)
        return noise

    def for_input(self, noise: torch.Tensor) -> torch.Tensor:
        """The noise the denoiser's input is made of: `noise` itself, or perturbed."""
        if not self.ip_gamma:
            return noise
        extra = torch.randn_like(noise)
        gamma = self.ip_gamma
        if self.ip_random_strength:
            gamma = torch.rand(1, device=noise.device, dtype=noise.dtype) * self.ip_gamma
        return noise + gamma * extra


def make_noise(latents: torch.Tensor, noise_offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise, plus a per-channel constant offset that lets the model learn very dark
    and very bright images (the offset noise trick)."""
    noise = torch.randn_like(latents)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1,
                                                   device=latents.device, dtype=latents.dtype)
    return noise


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float) -> torch.Tensor:
    """Multires (pyramid) noise: `noise` plus Gaussian noise drawn at ever coarser grids
    (each a random 2-4x smaller than the one before, level i weighted discount**i, level 0 at
    full size) and upsampled bilinearly, then divided by the whole tensor's standard deviation.
    Low-frequency noise lets the model change an image's overall layout and brightness.

    The grid ratios come from torch's generator (not Python's `random`), so a resumed run draws
    the same ones.
    """
    if noise.dim() != 4:
        raise ValueError(f"multires noise needs (batch, channels, height, width) latents, got shape "
                         f"{tuple(noise.shape)}")
    b, c, h, w = noise.shape
    out = noise.clone()
    for i in range(iterations):
        ratio = float(torch.rand(()).item()) * 2 + 2
        hn, wn = max(1, int(h / ratio**i)), max(1, int(w / ratio**i))
        coarse = torch.randn(b, c, hn, wn, device=noise.device, dtype=noise.dtype)
        out = out + F.interpolate(coarse, size=(h, w), mode="bilinear") * discount**i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


@dataclass(frozen=True)
class LossFunction:
    """The per-element training loss, kohya sd-scripts' `loss_type` with its Huber threshold.

    For an error d = prediction - target and threshold c: ``l2`` d^2, ``l1`` |d|, ``huber``
    2c(sqrt(d^2 + c^2) - c) (about d^2 for |d| << c, 2c|d| beyond), ``smooth_l1``
    2(sqrt(d^2 + c^2) - c) (the same divided by c). The threshold follows `huber_schedule` over
    the noise level (see :func:`huber_threshold`).
    """

    kind: str = "l2"
    huber_c: float = 0.1
    huber_schedule: str = "snr"
    huber_scale: float = 1.0

    @property
    def needs_threshold(self) -> bool:
        return self.kind in ("huber", "smooth_l1")

    def per_sample(self, pred: torch.Tensor, target: torch.Tensor, position: torch.Tensor | None = None,
                   noise_ratio: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of each sample (mean over all but the batch dimension), in fp32.

        `position` (B,): how far along the schedule each sample is, in [0, 1] (timestep / number
        of training timesteps); `noise_ratio` (B,): noise standard deviation over signal standard
        deviation. Only the Huber schedules read them. `mask`: see `apply_loss_mask`.
        """
        if self.kind == "l2":  # as F.mse_loss computes it, so runs from before loss_type are bit for bit the same
            element = apply_loss_mask(F.mse_loss(pred.float(), target.float(), reduction="none"), mask)
            return element.mean(dim=tuple(range(1, element.dim())))
        diff = pred.float() - target.float()
        if self.kind == "l1":
            element = diff.abs()
        elif self.kind in ("huber", "smooth_l1"):
            if position is None or noise_ratio is None:
                raise ValueError(f"loss_type {self.kind!r} needs each sample's position and noise ratio")
            c = huber_threshold(self.huber_schedule, self.huber_c, self.huber_scale, position.float(),
                                noise_ratio.float()).view(-1, *([1] * (diff.dim() - 1)))
            element = torch.sqrt(diff * diff + c * c) - c
            element = 2 * c * element if self.kind == "huber" else 2 * element
        else:
            raise ValueError(f"unknown loss_type {self.kind!r}; expected one of {', '.join(LOSS_TYPES)}")
        element = apply_loss_mask(element, mask)
        return element.mean(dim=tuple(range(1, element.dim())))


def huber_threshold(schedule: str, c: float, scale: float, position: torch.Tensor,
                    noise_ratio: torch.Tensor) -> torch.Tensor:
    """The Huber threshold of each sample, as kohya sd-scripts schedules it.

    ``constant``: c * scale. ``exponential``: scale * c**position, i.e. exp(-alpha t) with
    alpha = -ln(c) / T for timestep t of T: 1 at no noise, c at full noise. ``snr``:
    (1 - c) / (1 + r)**2 + c with r the noise-to-signal ratio (sqrt((1 - alpha_bar) / alpha_bar)
    for DDPM, s / (1 - s) on the rectified-flow path): 1 for a clean image, c for pure noise
    (`scale` is not applied, as in sd-scripts).
    """
    if schedule == "constant":
        return torch.full_like(position, c * scale)
    if schedule == "exponential":
        return torch.exp(math.log(c) * position) * scale
    if schedule == "snr":
        return (1 - c) / (1 + noise_ratio) ** 2 + c
    raise ValueError(f"unknown huber_schedule {schedule!r}; expected one of {', '.join(HUBER_SCHEDULES)}")


def sample_timesteps(batch: int, min_timestep: int, max_timestep: int, device: torch.device) -> torch.Tensor:
    return torch.randint(min_timestep, max_timestep, (batch,), device=device).long()


def target_for(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
               prediction_type: str) -> torch.Tensor:
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {prediction_type!r}")


def apply_loss_mask(per_element: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The (B, C, h, w) per-element loss times a (B, 1, H, W) loss mask in [0, 1], reduced to the
    latent grid by area averaging (kohya's `masked_loss`).

    The caller still takes the plain mean over every element, so masked-out cells count as zeros
    rather than being left out: a sample whose mask covers a quarter of the image contributes
    about a quarter of its unmasked loss, as in kohya's sd-scripts. Flow families' latents are
    4-D here too (Flux unpacks its 2x2 tokens in `denoise`), so one rule serves both objectives.
    """
    if mask is None:
        return per_element
    from ..data.masks import mask_to_latent_size

    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != per_element.shape[0]:
        raise ValueError(f"a loss mask must be (batch, 1, height, width) for a loss of shape "
                         f"{tuple(per_element.shape)}, got {tuple(mask.shape)}")
    mask = mask_to_latent_size(mask.to(per_element.device, torch.float32), per_element.shape[-2:])
    return per_element * mask


def diffusion_loss(model_pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, scheduler,
                   prediction_type: str, min_snr_gamma: float | None = None,
                   sample_weights: torch.Tensor | None = None, loss_fn: LossFunction | None = None,
                   mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample loss in fp32 (mean squared error, or `loss_fn`'s), then the weights, then the
    mean. With min_snr_gamma, each sample is weighted by min(SNR, gamma) / SNR (epsilon) or
    min(SNR, gamma) / (SNR + 1) (v-prediction), which stops the easy low-noise timesteps from
    dominating. `sample_weights` (B,) multiply each sample's loss before the mean: the
    prior-preservation weight of regularisation images. `mask`: see `apply_loss_mask`."""
    loss_fn = loss_fn or LossFunction()
    position = noise_ratio = None
    if loss_fn.needs_threshold:
        position, noise_ratio = ddpm_noise_level(scheduler, timesteps)
    loss = loss_fn.per_sample(model_pred, target, position, noise_ratio, mask)
    if min_snr_gamma is not None:
        from diffusers.training_utils import compute_snr  # imported here: the config imports this module

        snr = compute_snr(scheduler, timesteps).float()
        clipped = torch.clamp(snr, max=min_snr_gamma)
        weights = clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr.clamp_min(1e-8)
        loss = loss * weights
    if sample_weights is not None:
        loss = loss * sample_weights.to(loss.device, loss.dtype)
    return loss.mean()


def ddpm_noise_level(scheduler, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(timestep / number of training timesteps, noise-to-signal ratio sqrt((1 - a) / a)) per
    sample, a the schedule's cumulative alpha: what the Huber schedules read."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    position = timesteps.float() / scheduler.config.num_train_timesteps
    return position, ((1 - alphas) / alphas).sqrt()


def denoising_loss(latents: torch.Tensor, denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   scheduler, prediction_type: str, *, noise_offset: float = 0.0, min_timestep: int = 0,
                   max_timestep: int | None = None, min_snr_gamma: float | None = None,
                   sample_weights: torch.Tensor | None = None, noise: NoiseOptions | None = None,
                   loss_fn: LossFunction | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One training step's loss: noise the latents at random timesteps, ask ``denoise(noisy,
    timesteps)`` for its prediction, compare with the target.

    The trainer, the toy model's pretraining and the method comparison all call this, so the
    random draws (noise, then timesteps, then any input perturbation) and the objective are the
    same everywhere. `noise` (every noise option) replaces the `noise_offset` shorthand.
    """
    if noise is not None and noise_offset:
        raise ValueError("give the offset in `noise` (NoiseOptions) or as noise_offset, not both")
    noise = noise or NoiseOptions(offset=noise_offset)
    with torch.no_grad():
        eps = noise.draw(latents)
        high = max_timestep or scheduler.config.num_train_timesteps
        timesteps = sample_timesteps(latents.shape[0], min_timestep, high, latents.device)
        noisy = scheduler.add_noise(latents, noise.for_input(eps), timesteps)
        target = target_for(scheduler, latents, eps, timesteps, prediction_type)
    pred = denoise(noisy, timesteps)
    return diffusion_loss(pred, target, timesteps, scheduler, prediction_type, min_snr_gamma, sample_weights,
                          loss_fn, mask)


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
                       noise: NoiseOptions | None = None, loss_fn: LossFunction | None = None,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
    """One rectified-flow training step: x_s = (1 - s) x_0 + s e, the model predicts e - x_0.

    ``denoise(noisy, timesteps)`` gets timesteps s * 1000, the scale of Diffusers' flow-matching
    schedulers (the family's forward rescales if its denoiser wants [0, 1]). The draws are noise,
    then positions, then any input perturbation, as in :func:`denoising_loss`. For the Huber
    schedules a sample's position is s (the shifted one the denoiser sees) and its
    noise-to-signal ratio s / (1 - s). `mask`: see `apply_loss_mask`.
    """
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    if noise is not None and noise_offset:
        raise ValueError("give the offset in `noise` (NoiseOptions) or as noise_offset, not both")
    noise = noise or NoiseOptions(offset=noise_offset)
    loss_fn = loss_fn or LossFunction()
    with torch.no_grad():
        eps = noise.draw(latents)
        sigmas = shift_sigmas(sample_flow_positions(latents.shape[0], sampling, logit_mean=logit_mean,
                                                    logit_std=logit_std, mode_scale=mode_scale,
                                                    device=latents.device), shift)
        s = sigmas.view(-1, *([1] * (latents.dim() - 1)))
        noisy = (1 - s) * latents + s * noise.for_input(eps)
        target = eps - latents
    pred = denoise(noisy, sigmas * 1000)
    per_sample = loss_fn.per_sample(pred, target, sigmas, sigmas / (1 - sigmas), mask)
    per_sample = per_sample * compute_loss_weighting_for_sd3("none" if weighting == "none" else weighting, sigmas)
    if sample_weights is not None:
        per_sample = per_sample * sample_weights.to(per_sample.device, per_sample.dtype)
    return per_sample.mean()

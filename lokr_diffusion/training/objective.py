"""Which objective a run trains, from the family, the model's scheduler and `[train]`.

A UNet family trains DDPM noise prediction (epsilon or v, with the schedule options that go
with it); a flow-matching family (Flux, SD3) trains rectified flow. The options of one are
refused on the other with the reason, so a config never silently does something else.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..errors import ConfigError
from .loss import LossFunction, NoiseOptions, denoising_loss, flow_matching_loss

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# [train] keys that only mean something for DDPM noise prediction, and why
NOISE_ONLY = {
    "min_snr_gamma": "min-SNR weights by the DDPM noise schedule's signal-to-noise ratio",
    "zero_terminal_snr": "it rescales a DDPM beta schedule",
    "min_timestep": "flow matching draws positions in [0, 1] from `timestep_sampling`",
    "max_timestep": "flow matching draws positions in [0, 1] from `timestep_sampling`",
    "multires_noise_iterations": "the noise is the flow's end point and part of its velocity target, while "
                                 "sampling starts from white Gaussian noise; sd-scripts adds it to DDPM "
                                 "training only",
}
# [train] keys that only mean something for rectified flow
FLOW_ONLY = ("timestep_sampling", "logit_mean", "logit_std", "mode_scale", "shift", "loss_weighting", "guidance")
_NOISE_DEFAULTS = {"min_snr_gamma": None, "zero_terminal_snr": False, "min_timestep": 0, "max_timestep": None,
                   "multires_noise_iterations": 0}


class Objective(Protocol):
    def loss(self, latents: torch.Tensor, denoise: Denoise, sample_weights: torch.Tensor | None = None,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        ...

    def describe(self) -> str:
        ...


@dataclass
class NoisePrediction:
    """DDPM training of epsilon or v, the objective of the SD 1.x / 2.x / SDXL UNets."""

    scheduler: Any
    prediction_type: str
    zero_snr: bool
    noise: NoiseOptions = NoiseOptions()
    min_timestep: int = 0
    max_timestep: int | None = None
    min_snr_gamma: float | None = None
    loss_fn: LossFunction = LossFunction()

    def loss(self, latents: torch.Tensor, denoise: Denoise, sample_weights: torch.Tensor | None = None,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        return denoising_loss(latents, denoise, self.scheduler, self.prediction_type, noise=self.noise,
                              min_timestep=self.min_timestep, max_timestep=self.max_timestep,
                              min_snr_gamma=self.min_snr_gamma, sample_weights=sample_weights, loss_fn=self.loss_fn,
                              mask=mask)

    def describe(self) -> str:
        return (f"prediction {self.prediction_type}{', zero terminal SNR' if self.zero_snr else ''}"
                f"{describe_options(self.noise, self.loss_fn)}")


@dataclass
class RectifiedFlow:
    """Flow matching with a timestep density and a shift: fixed, or from the image's token count
    (`tokens(latents)`) between the scheduler's base and max shift, as Flux samples."""

    sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    weighting: str = "none"
    noise: NoiseOptions = NoiseOptions()
    loss_fn: LossFunction = LossFunction()
    fixed_shift: float | None = 1.0
    dynamic: tuple[int, int, float, float] | None = None  # base/max sequence length, base/max shift
    tokens: Callable[[torch.Tensor], int] | None = None

    def shift_for(self, latents: torch.Tensor) -> float:
        if self.dynamic is None or self.tokens is None:
            return float(self.fixed_shift or 1.0)
        base_len, max_len, base_shift, max_shift = self.dynamic
        slope = (max_shift - base_shift) / (max_len - base_len)
        return math.exp(base_shift + slope * (self.tokens(latents) - base_len))

    def loss(self, latents: torch.Tensor, denoise: Denoise, sample_weights: torch.Tensor | None = None,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        return flow_matching_loss(latents, denoise, self.shift_for(latents), sampling=self.sampling,
                                  logit_mean=self.logit_mean, logit_std=self.logit_std, mode_scale=self.mode_scale,
                                  weighting=self.weighting, noise=self.noise, loss_fn=self.loss_fn,
                                  sample_weights=sample_weights, mask=mask)

    def describe(self) -> str:
        shift = ("resolution-dependent shift" if self.dynamic is not None and self.tokens is not None
                 else f"shift {self.fixed_shift:g}")
        return (f"rectified flow ({self.sampling} timesteps, {shift}, loss weighting {self.weighting})"
                f"{describe_options(self.noise, self.loss_fn)}")


def describe_options(noise: NoiseOptions, loss_fn: LossFunction) -> str:
    """The noise and loss options that differ from plain training, for the start-of-run line."""
    parts = []
    if loss_fn.kind != "l2":
        parts.append(f"{loss_fn.kind} loss" + (f" (huber_c {loss_fn.huber_c:g}, {loss_fn.huber_schedule} schedule)"
                                               if loss_fn.needs_threshold else ""))
    if noise.multires_iterations:
        parts.append(f"multires noise ({noise.multires_iterations} levels, discount {noise.multires_discount:g})")
    if noise.ip_gamma:
        parts.append(f"input perturbation {noise.ip_gamma:g}" + (" (random strength)" if noise.ip_random_strength
                                                                  else ""))
    return "".join(f", {p}" for p in parts)


def noise_options(t_cfg: Any) -> NoiseOptions:
    return NoiseOptions(offset=t_cfg.noise_offset, multires_iterations=t_cfg.multires_noise_iterations,
                        multires_discount=t_cfg.multires_noise_discount, ip_gamma=t_cfg.ip_noise_gamma,
                        ip_random_strength=t_cfg.ip_noise_gamma_random_strength)


def loss_function(t_cfg: Any) -> LossFunction:
    return LossFunction(kind=t_cfg.loss_type, huber_c=t_cfg.huber_c, huber_schedule=t_cfg.huber_schedule,
                        huber_scale=t_cfg.huber_scale)


def build_objective(family: Any, pipe: Any, t_cfg: Any, denoiser: Any = None) -> Objective:
    """The objective for `pipe` (whose sampling scheduler may be switched to match a
    zero-terminal-SNR fine-tune); options of the other objective are refused."""
    if getattr(family, "objective", "noise") == "flow":
        return _flow(family, pipe, t_cfg, denoiser)
    return _noise(pipe, t_cfg)


def _noise(pipe: Any, t_cfg: Any) -> NoisePrediction:
    from diffusers import DDPMScheduler

    set_flow = [k for k in FLOW_ONLY if getattr(t_cfg, k, None) is not None]
    if set_flow:
        raise ConfigError(f"train.{set_flow[0]}: a flow-matching option, but this model trains DDPM noise "
                          "prediction; remove it (it applies to Flux and SD3)")
    prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
    # a model pretrained on a zero-terminal-SNR schedule says so in its scheduler config; fine-tune it on the same
    model_zero_snr = bool(pipe.scheduler.config.get("rescale_betas_zero_snr", False))
    zero_snr = t_cfg.zero_terminal_snr or model_zero_snr
    if zero_snr and prediction_type != "v_prediction":
        raise ConfigError("train.zero_terminal_snr needs v-prediction (model.prediction_type = 'v_prediction')")
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type,
                                          rescale_betas_zero_snr=zero_snr)
    if zero_snr and not model_zero_snr:  # the sampling scheduler must match what training switched on
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, rescale_betas_zero_snr=True)
    return NoisePrediction(scheduler, prediction_type, zero_snr, noise=noise_options(t_cfg),
                           min_timestep=t_cfg.min_timestep,
                           max_timestep=t_cfg.max_timestep or scheduler.config.num_train_timesteps,
                           min_snr_gamma=t_cfg.min_snr_gamma, loss_fn=loss_function(t_cfg))


def _flow(family: Any, pipe: Any, t_cfg: Any, denoiser: Any) -> RectifiedFlow:
    for key, why in NOISE_ONLY.items():
        if getattr(t_cfg, key) != _NOISE_DEFAULTS[key]:
            raise ConfigError(f"train.{key}: not available for {family.title}, which trains with flow matching "
                              f"({why}); remove it")
    cfg = pipe.scheduler.config
    fixed = t_cfg.shift if t_cfg.shift is not None else float(cfg.get("shift", 1.0))
    dynamic = None
    if t_cfg.shift is None and cfg.get("use_dynamic_shifting", False):
        dynamic = (int(cfg.get("base_image_seq_len", 256)), int(cfg.get("max_image_seq_len", 4096)),
                   float(cfg.get("base_shift", 0.5)), float(cfg.get("max_shift", 1.15)))
    return RectifiedFlow(sampling=t_cfg.timestep_sampling or "logit_normal",
                         logit_mean=0.0 if t_cfg.logit_mean is None else t_cfg.logit_mean,
                         logit_std=1.0 if t_cfg.logit_std is None else t_cfg.logit_std,
                         mode_scale=1.29 if t_cfg.mode_scale is None else t_cfg.mode_scale,
                         weighting=t_cfg.loss_weighting or "none", noise=noise_options(t_cfg),
                         loss_fn=loss_function(t_cfg), fixed_shift=fixed, dynamic=dynamic,
                         tokens=getattr(family, "image_tokens", None))

"""The toy base model's architecture: Stable Diffusion 1.x in miniature.

Same classes and block types as SD 1.5 (UNet2DConditionModel with CrossAttnDownBlock2D /
DownBlock2D / UpBlock2D / CrossAttnUpBlock2D, 1x1-conv proj_in/proj_out, AutoencoderKL, a
CLIPTextModel and CLIP BPE tokenizer), so the trainer, the LyCORIS naming and the loaders
treat it exactly like a real SD1 checkpoint. It differs in size only: three UNet levels
instead of four and one layer per block so a CPU can pretrain it in minutes, and a VAE that
downsamples by 4 rather than 8 so 64 px images keep their shape edges in a 16 x 16 latent.
"""
from __future__ import annotations

from typing import Any

import torch

from ..families import SD1

__all__ = ["LATENT_SIZE", "PIXEL_SIZE", "build_scheduler", "build_text_encoder", "build_unet", "build_vae",
           "toy_text_config", "toy_unet_config", "toy_vae_config"]

PIXEL_SIZE = 64
VAE_FACTOR = 4
LATENT_SIZE = PIXEL_SIZE // VAE_FACTOR
TEXT_WIDTH = 64


def toy_unet_config() -> dict[str, Any]:
    """SD 1.5's UNet config with the widths, depth and level count shrunk."""
    cfg = SD1.real_unet_config()
    cfg.update(
        block_out_channels=[32, 64, 64],
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        layers_per_block=1,
        attention_head_dim=2,  # the number of heads, in SD1's historical naming
        cross_attention_dim=TEXT_WIDTH,
        norm_num_groups=8,
        sample_size=LATENT_SIZE,
    )
    return cfg


def toy_vae_config(scaling_factor: float = 1.0) -> dict[str, Any]:
    """Three encoder levels, so two downsamplings: 64 px -> 16 x 16 x 4 latents."""
    return dict(in_channels=3, out_channels=3, latent_channels=4,
                down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                block_out_channels=[16, 32, 32], layers_per_block=1, norm_num_groups=8,
                sample_size=PIXEL_SIZE, scaling_factor=scaling_factor)


def toy_text_config(vocab_size: int, bos: int, eos: int) -> dict[str, Any]:
    """The CLIP ViT-L text tower's config, two layers of width 64."""
    (_, cfg), = SD1.real_text_encoder_configs()
    cfg.update(hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH, num_attention_heads=4,
               num_hidden_layers=2, projection_dim=TEXT_WIDTH, vocab_size=vocab_size,
               bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    return cfg


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**toy_unet_config())


def build_vae(scaling_factor: float = 1.0):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**toy_vae_config(scaling_factor))


def build_text_encoder(tokenizer) -> torch.nn.Module:
    import transformers

    bos, eos = tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
    cfg = toy_text_config(len(tokenizer.get_vocab()), bos, eos)
    return transformers.CLIPTextModel(transformers.CLIPTextConfig(**cfg))


def build_scheduler():
    """SD 1.x's noise schedule rescaled to zero terminal SNR, with v-prediction, sampled with
    DPM-Solver++ from the last timestep ("trailing") so 20 steps are enough on a CPU.

    Why zero terminal SNR: SD's own schedule keeps ~7% of the image at the last timestep. In a
    16 x 16 latent that faint image is visible, so a model trained on it learns to take the
    layout (where the shape is, even which shape) from the starting noise instead of the
    caption, and at sampling time, from pure noise, it follows the noise. With nothing of the
    image left at the last step the caption alone decides the layout. v-prediction is what
    makes the last step learnable (predicting the noise from pure noise says nothing).
    """
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", steps_offset=1, prediction_type="v_prediction",
                                       rescale_betas_zero_snr=True, timestep_spacing="trailing",
                                       algorithm_type="dpmsolver++", solver_order=2)

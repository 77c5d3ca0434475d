"""Stable Diffusion 1.x (1.4, 1.5 and their fine-tunes): one CLIP ViT-L text encoder, a UNet
whose transformer proj_in/proj_out are 1x1 convs, epsilon prediction."""
from __future__ import annotations

from .stable_diffusion import CLIP_L, SD_DOWN, SD_UP, UNET_COMMON, StableDiffusionFamily


class SD1(StableDiffusionFamily):
    name = "sd1"
    title = "SD 1.x"
    aliases = ("sd15", "sd1.5", "sd-1.5", "sd1x")
    real_unet = {  # runwayml / stable-diffusion-v1-5, unet/config.json
        **UNET_COMMON,
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "cross_attention_dim": 768,
        "down_block_types": SD_DOWN,
        "up_block_types": SD_UP,
        "sample_size": 64,
    }
    real_text = [("CLIPTextModel", CLIP_L)]
    tiny_unet = {"block_out_channels": [16, 32, 64, 64], "attention_head_dim": 2, "cross_attention_dim": 32}
    tiny_scheduler = ("PNDMScheduler", {"skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1})
    checkpoint_text_prefixes = (("cond_stage_model.transformer.", "clip"),)
    checkpoint_marker = "cond_stage_model.transformer."
    cross_attention_width = 768
    text_encoder_widths = (("te", 768),)
    base_model_version = "sd_v1"
    metadata_versions = ("sd_v1",)
    architecture = "stable-diffusion-v1/lora"
    checkpoint_architecture = "stable-diffusion-v1"


FAMILY = SD1()

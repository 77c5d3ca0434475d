"""Stable Diffusion 2.x (2.0, 2.1, 512 and 768-v): one OpenCLIP ViT-H text encoder, linear
transformer projections. The 768 models predict v; a v-prediction SD2 is the same family for
naming, but files record it as ``sd2-v`` (version, resolution and prediction type differ)."""
from __future__ import annotations

from .stable_diffusion import OPENCLIP_H, SD_DOWN, SD_UP, UNET_COMMON, StableDiffusionFamily


class SD2(StableDiffusionFamily):
    name = "sd2"
    title = "SD 2.x"
    aliases = ("sd21", "sd2.1", "sd2-v", "sd2v", "sd2x")
    real_unet = {  # stabilityai / stable-diffusion-2-1 (768-v), unet/config.json
        **UNET_COMMON,
        "attention_head_dim": [5, 10, 20, 20],
        "block_out_channels": [320, 640, 1280, 1280],
        "cross_attention_dim": 1024,
        "down_block_types": SD_DOWN,
        "up_block_types": SD_UP,
        "dual_cross_attention": False,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "sample_size": 96,
        "upcast_attention": True,
        "use_linear_projection": True,
    }
    real_text = [("CLIPTextModel", OPENCLIP_H)]
    tiny_unet = {"block_out_channels": [16, 32, 64, 64], "attention_head_dim": [2, 4, 8, 8],
                 "cross_attention_dim": 32}
    # the tiny SD2 imitates the 768-v SD 2.1: v-prediction
    tiny_scheduler = ("DDIMScheduler", {"prediction_type": "v_prediction", "clip_sample": False,
                                        "set_alpha_to_one": False, "steps_offset": 1})
    checkpoint_text_prefixes = (("cond_stage_model.model.", "openclip"),)
    checkpoint_marker = "cond_stage_model.model."
    cross_attention_width = 1024
    text_encoder_widths = (("te", 1024),)
    base_model_version = "sd_v2"
    metadata_versions = ("sd_v2", "sd_v2_v")
    architecture = "stable-diffusion-v2-512/lora"
    checkpoint_architecture = "stable-diffusion-v2-512"

    def variant(self, prediction_type: str | None) -> str:
        return "sd2-v" if prediction_type == "v_prediction" else "sd2"

    def file_metadata(self, prediction_type: str | None = None) -> dict[str, str]:
        meta = super().file_metadata(prediction_type)
        meta["ss_v2"] = "True"
        if prediction_type == "v_prediction":
            meta.update({"ss_base_model_version": "sd_v2_v", "modelspec.architecture": "stable-diffusion-v2-768-v/lora",
                         "modelspec.resolution": "768x768", "modelspec.prediction_type": "v"})
        return meta

    def checkpoint_metadata_architecture(self, prediction_type: str | None) -> str:
        return "stable-diffusion-v2-768-v" if prediction_type == "v_prediction" else self.checkpoint_architecture


FAMILY = SD2()

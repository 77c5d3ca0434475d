"""SDXL base 1.0 and its fine-tunes: CLIP ViT-L plus OpenCLIP ViT-bigG (penultimate hidden
states concatenated, pooled output of the second), size/crop micro-conditioning, three UNet
levels, and files that name UNet modules by the original (sgm) paths as sd-scripts does."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .stable_diffusion import CLIP_L, OPENCLIP_BIGG, UNET_COMMON, StableDiffusionFamily


class SDXL(StableDiffusionFamily):
    name = "sdxl"
    title = "SDXL"
    aliases = ("sd-xl", "xl")
    pipeline_class = "StableDiffusionXLPipeline"
    text_encoder_attrs = ("text_encoder", "text_encoder_2")
    tokenizer_attrs = ("tokenizer", "tokenizer_2")
    real_unet = {  # stabilityai / stable-diffusion-xl-base-1.0, unet/config.json
        **UNET_COMMON,
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280],
        "class_embed_type": None,
        "class_embeddings_concat": False,
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "cross_attention_dim": 2048,
        "cross_attention_norm": None,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "dual_cross_attention": False,
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "mid_block_only_cross_attention": None,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "num_attention_heads": None,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "projection_class_embeddings_input_dim": 2816,
        "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": False,
        "resnet_time_scale_shift": "default",
        "sample_size": 128,
        "time_cond_proj_dim": None,
        "time_embedding_act_fn": None,
        "time_embedding_dim": None,
        "time_embedding_type": "positional",
        "timestep_post_act": None,
        "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "upcast_attention": None,
        "use_linear_projection": True,
    }
    real_text = [("CLIPTextModel", CLIP_L), ("CLIPTextModelWithProjection", OPENCLIP_BIGG)]
    tiny_unet = {"block_out_channels": [16, 32, 64], "attention_head_dim": [2, 4, 8],
                 "cross_attention_dim": 64, "transformer_layers_per_block": [1, 2, 2],
                 "addition_time_embed_dim": 8, "addition_embed_type_num_heads": 8,
                 # 6 micro-conditioning numbers * 8 + text_encoder_2 projection_dim 32
                 "projection_class_embeddings_input_dim": 6 * 8 + 32}
    tiny_scheduler = ("EulerDiscreteScheduler", {"steps_offset": 1, "timestep_spacing": "leading",
                                                 "interpolation_type": "linear", "use_karras_sigmas": False})
    vae_scaling_factor = 0.13025
    ldm_unet_names = True
    layout_written = "`lora_unet_` + original (sgm) names, `lora_te1_`/`lora_te2_` + `text_model_` (sd-scripts)"
    top_level_in_full = False
    checkpoint_text_prefixes = (("conditioner.embedders.0.transformer.", "clip"),
                                ("conditioner.embedders.1.model.", "openclip"))
    checkpoint_marker = "conditioner.embedders."
    cross_attention_width = 2048
    text_encoder_widths = (("te1", 768), ("te2", 1280))
    base_model_version = "sdxl_base_v1-0"
    architecture = "stable-diffusion-xl-v1-base/lora"
    checkpoint_architecture = "stable-diffusion-xl-v1-base"
    resolution = "1024x1024"
    implementation = "https://github.com/Stability-AI/generative-models"
    needs_base_model_version = True
    shared_name = shared_title = ""  # no other family's files share its keys
    clip_skip_refusal = ("SDXL already reads the penultimate layer of both CLIP encoders (kohya sd-scripts ignores "
                         "clip_skip for SDXL)")

    def matches_pipeline_class(self, class_name: str) -> bool:
        return class_name.startswith("StableDiffusionXL")

    def matches_metadata(self, metadata: Mapping[str, str]) -> bool:
        return metadata.get("ss_base_model_version", "").startswith("sdxl")

    def encode_text(self, text_encoders: Sequence[nn.Module], input_ids: Sequence[torch.Tensor],
                    device: torch.device) -> dict[str, torch.Tensor]:
        hidden, pooled = [], None
        for te, ids in zip(text_encoders, input_ids):
            out = te(ids.to(device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]
        return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled_prompt_embeds": pooled}

    def added_conditions(self, embeds: Mapping[str, torch.Tensor], batch: Mapping[str, Any],
                         device: torch.device) -> dict[str, Any]:
        from ..data import sdxl_add_time_ids

        return {"added_cond_kwargs": {"text_embeds": embeds["pooled_prompt_embeds"].to(device),
                                      "time_ids": sdxl_add_time_ids(batch).float().to(device)}}

    def tokenizer_pads(self) -> dict[str, str]:
        return {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}  # SDXL's second tokenizer pads with "!"

    def assemble_pipeline(self, vae, encoders, tokenizers, unet, scheduler):
        import diffusers

        return diffusers.StableDiffusionXLPipeline(
            vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1], tokenizer=tokenizers["tokenizer"],
            tokenizer_2=tokenizers["tokenizer_2"], unet=unet, scheduler=scheduler, add_watermarker=False)


FAMILY = SDXL()

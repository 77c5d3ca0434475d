"""Qwen-Image: ``QwenImageTransformer2DModel`` (a 60-block MMDiT) in ``QwenImagePipeline``, with a
Qwen2.5-VL-7B text encoder. Loaded, not trained, by lokr-diffusion.

**Layouts ComfyUI accepts** (read in ComfyUI's ``comfy/lora.py`` ``model_lora_keys_unet``, the
generic part and the ``comfy.model_base.QwenImage`` branch, and its model
``comfy/ldm/qwen_image/model.py``, at commit 783545f689a0 (v0.33.0, 2026-08-22) of a mirror of
ComfyUI's repository (yzkee/ComfyUI); the branch is the same in v0.3.64, 2025-10). ComfyUI's Qwen-Image
model uses the Diffusers module names (``transformer_blocks.N.img_mod.1``, ``img_mlp.net.0.proj``,
``norm_out.linear``...), so every layout is 1:1 and nothing is fused:

============== ============================================ =====================================
layout         key of ``transformer_blocks.0.attn.to_q``    ComfyUI code
============== ============================================ =====================================
lycoris        ``lycoris_transformer_blocks_0_attn_to_q``   QwenImage branch (SimpleTuner LyCORIS)
transformer    ``transformer.transformer_blocks.0.attn.to_q`` QwenImage branch (Diffusers / PEFT)
bare           ``transformer_blocks.0.attn.to_q``           QwenImage branch ("QwenImage LoRA format")
kohya          ``lora_unet_transformer_blocks_0_attn_to_q`` generic ``lora_unet_`` + model names
diffusion_model ``diffusion_model.transformer_blocks.0.attn.to_q`` generic dotted model names
============== ============================================ =====================================

LoRA tensors may be ``lora_up/lora_down``, ``lora_A/lora_B`` or ``lora_A.default/lora_B.default``
(ComfyUI's ``weight_adapter/lora.py``); LoHa and LoKr as everywhere. Text-encoder keys are not read.

**Config**: :data:`QWEN_IMAGE_TRANSFORMER` is Qwen/Qwen-Image's ``transformer/config.json`` as far as
it can be established offline: these are the defaults of Diffusers 0.42's
``QwenImageTransformer2DModel``, which the Diffusers port took from the published model; they give
60 blocks x 24 heads x 128 = 3072 wide, a 3584-wide text input (Qwen2.5-VL-7B's hidden size) and
20.4 B parameters, the size the model card states (20 B).
"""
from __future__ import annotations

from typing import Any

from .dit_loading import KeyLayout, LoadingFamily

__all__ = ["FAMILY", "QWEN_IMAGE_TRANSFORMER", "QwenImageFamily"]

QWEN_IMAGE_TRANSFORMER: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
}
TINY_TRANSFORMER = {"num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
                    "in_channels": 16, "out_channels": 4, "axes_dims_rope": (4, 6, 6)}

_BLOCK = r"transformer_blocks\.\d+\."
NAMES = (rf"{_BLOCK}(?:(?:img|txt)_mod\.1|attn\.(?:to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)"
         r"|(?:img|txt)_mlp\.net\.(?:0\.proj|2))"
         r"|time_text_embed\.timestep_embedder\.linear_[12]|img_in|txt_in|norm_out\.linear|proj_out")

LAYOUTS = {
    "lycoris": KeyLayout("lycoris_", False, True, "lycoris_<path, dots as _>", "SimpleTuner (LyCORIS)"),
    "transformer": KeyLayout("transformer.", False, False, "transformer.<path>",
                             "Diffusers/PEFT LoRA, ai-toolkit, SimpleTuner"),
    "bare": KeyLayout("", False, False, "<path>", "DiffSynth-Studio; ComfyUI's \"QwenImage LoRA format\""),
    "kohya": KeyLayout("lora_unet_", True, True, "lora_unet_<path, dots as _>", "kohya sd-scripts, musubi-tuner"),
    "diffusion_model": KeyLayout("diffusion_model.", True, False, "diffusion_model.<path>",
                                 "generic; ComfyUI's own key names"),
}


class QwenImageFamily(LoadingFamily):
    name = "qwen-image"
    title = "Qwen-Image"
    aliases = ("qwen", "qwenimage", "qwen_image")
    pipeline_class = "QwenImagePipeline"
    pipeline_classes = ("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline")
    transformer_class = "QwenImageTransformer2DModel"
    config_keys = frozenset({"joint_attention_dim", "zero_cond_t", "use_additional_t_cond", "use_layer3d_rope"})
    real_transformer = QWEN_IMAGE_TRANSFORMER
    tiny_transformer = TINY_TRANSFORMER
    key_layouts = LAYOUTS
    diffusers_names = NAMES
    original_names = NAMES  # ComfyUI's model keeps the Diffusers names
    attention_width = 3072  # 24 heads x 128, as Flux.1's: the width tells it from SD3's names only
    text_encoder_title = "Qwen2.5-VL-7B"
    architecture = "qwen-image/lora"
    base_model_version = "qwen_image"
    metadata_versions = ("qwenimage",)
    layouts_read = ("`lycoris_`, `transformer.` and bare Diffusers paths, kohya `lora_unet_` and `diffusion_model.` "
                    "(the same names: ComfyUI's model keeps them), Diffusers/PEFT `lora_A`/`lora_B`; transformer "
                    "only (no text-encoder keys)")

    def matches_checkpoint_keys(self, keys) -> bool:
        """A single-file Qwen-Image transformer: Diffusers names with ``img_mod.1``, maybe under
        ``model.diffusion_model.``."""
        names = [k.split("diffusion_model.", 1)[-1] for k in keys]
        return (any(n.startswith("transformer_blocks.0.img_mod.1.") for n in names)
                and "txt_in.weight" in names and not any(n.startswith("single_transformer_blocks.") for n in names))


FAMILY = QwenImageFamily()

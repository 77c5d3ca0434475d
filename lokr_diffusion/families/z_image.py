"""Z-Image (Turbo): ``ZImageTransformer2DModel`` (a single-stream DiT, 30 layers + 2 noise and 2
context refiner layers) in ``ZImagePipeline``, with a Qwen3-4B text encoder. Loaded, not trained.

**Layouts ComfyUI accepts** (read in ComfyUI's ``comfy/lora.py`` ``model_lora_keys_unet``: the
generic part and the ``comfy.model_base.Lumina2`` branch, which serves Z-Image, with
``comfy/utils.py`` ``z_image_to_diffusers`` and ``comfy/model_detection.py`` (the Lumina 2 branch, dim
3840 = Z-Image), at commit 783545f689a0 (v0.33.0, 2026-08-22) of a mirror of ComfyUI's repository
(yzkee/ComfyUI)). ComfyUI's model (``comfy/ldm/lumina/model.py``) keeps the original names: q, k and
v are one fused ``attention.qkv`` (rows [0,D), [D,2D), [2D,3D), D = dim = n_heads x head dim, since
n_kv_heads = n_heads), ``attention.out`` is Diffusers' ``attention.to_out.0``, and Diffusers'
``all_x_embedder.2-1`` / ``all_final_layer.2-1.*`` are ``x_embedder`` / ``final_layer.*``; every other
layer has the same name in both.

=============== ========================================================== ==========================
layout          key of ``layers.0.attention.to_q`` (q of the fused qkv)    ComfyUI code
=============== ========================================================== ==========================
lycoris         ``lycoris_layers_0_attention_to_q``                         Lumina2 branch
transformer     ``transformer.layers.0.attention.to_q``                     Lumina2 branch
bare            ``layers.0.attention.to_q``                                 Lumina2 branch
diffusion_model ``diffusion_model.layers.0.attention.to_q``, or the fused  Lumina2 branch (Diffusers
                ``diffusion_model.layers.0.attention.qkv``                  names), generic (original)
kohya           ``lora_unet_layers_0_attention_qkv`` (fused)                generic ``lora_unet_``
=============== ========================================================== ==========================

A fused ``qkv`` module is applied to the Diffusers ``to_q``, ``to_k``, ``to_v`` as row slices. No
``lora_transformer_`` (OneTrainer) layout: the Lumina2 branch has none. Text-encoder keys are not read.

**Config**: :data:`Z_IMAGE_TRANSFORMER` is Tongyi-MAI/Z-Image-Turbo's transformer as far as it can be
established offline: the defaults of Diffusers 0.42's ``ZImageTransformer2DModel`` (dim 3840, 30
layers, 30 heads, 2 refiner layers, caption width 2560 = Qwen3-4B's hidden size), which agree with
ComfyUI's detection of Z-Image (dim 3840, 30 heads, axes 32/48/48) and give 6.15 B parameters (the
model card: 6 B). ComfyUI sets ``axes_lens`` [1536, 512, 512] where Diffusers' default is
[1024, 512, 512]; it changes no module.
"""
from __future__ import annotations

import re
from typing import Any

from torch import nn

from .dit_loading import KeyLayout, LoadingFamily, stacked

__all__ = ["FAMILY", "Z_IMAGE_TRANSFORMER", "ZImageFamily"]

Z_IMAGE_TRANSFORMER: dict[str, Any] = {
    "all_patch_size": (2,),
    "all_f_patch_size": (1,),
    "in_channels": 16,
    "dim": 3840,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "n_heads": 30,
    "n_kv_heads": 30,
    "norm_eps": 1e-5,
    "qk_norm": True,
    "cap_feat_dim": 2560,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "axes_dims": [32, 48, 48],
    "axes_lens": [1024, 512, 512],
}
TINY_TRANSFORMER = {"dim": 48, "n_layers": 2, "n_refiner_layers": 1, "n_heads": 2, "n_kv_heads": 2, "in_channels": 4,
                    "cap_feat_dim": 16, "axes_dims": [8, 8, 8], "axes_lens": [64, 32, 32]}

_BLOCK = r"(?:layers|noise_refiner|context_refiner)\.\d+\."
_SHARED = rf"{_BLOCK}(?:feed_forward\.w[123]|adaLN_modulation\.0)|t_embedder\.mlp\.[02]|cap_embedder\.1"
DIFFUSERS_NAMES = (rf"{_BLOCK}attention\.(?:to_[qkv]|to_out\.0)|{_SHARED}"
                   r"|all_x_embedder\.\d+-\d+|all_final_layer\.\d+-\d+\.(?:linear|adaLN_modulation\.1)")
ORIGINAL_NAMES = rf"{_BLOCK}attention\.(?:qkv|out)|{_SHARED}|x_embedder|final_layer\.(?:linear|adaLN_modulation\.1)"

LAYOUTS = {
    "lycoris": KeyLayout("lycoris_", False, True, "lycoris_<Diffusers path, dots as _>", "SimpleTuner (LyCORIS)"),
    "transformer": KeyLayout("transformer.", False, False, "transformer.<Diffusers path>",
                             "Diffusers/PEFT LoRA, ai-toolkit"),
    "bare": KeyLayout("", False, False, "<Diffusers path>", "DiffSynth-Studio"),
    "diffusion_model": KeyLayout("diffusion_model.", True, False,
                                 "diffusion_model.<original or Diffusers path>, q/k/v as one qkv or apart",
                                 "generic; ComfyUI's own key names", diffusers_too=True),
    "kohya": KeyLayout("lora_unet_", True, True, "lora_unet_<original path, dots as _>, q/k/v fused as qkv",
                       "kohya sd-scripts, musubi-tuner"),
}
_RENAMED = {"attention.to_out.0": "attention.out"}
_TOP = re.compile(r"all_(x_embedder|final_layer)\.\d+-\d+(\..+)?")
_QKV = re.compile(rf"({_BLOCK})attention\.to_[qkv]")


class ZImageFamily(LoadingFamily):
    name = "z-image"
    title = "Z-Image"
    aliases = ("zimage", "z-image-turbo", "z_image")
    pipeline_class = "ZImagePipeline"
    pipeline_classes = ("ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageInpaintPipeline")
    transformer_class = "ZImageTransformer2DModel"
    config_keys = frozenset({"all_patch_size", "all_f_patch_size", "cap_feat_dim", "n_refiner_layers"})
    real_transformer = Z_IMAGE_TRANSFORMER
    tiny_transformer = TINY_TRANSFORMER
    key_layouts = LAYOUTS
    diffusers_names = DIFFUSERS_NAMES
    original_names = ORIGINAL_NAMES
    text_encoder_title = "Qwen3-4B"
    architecture = "z-image/lora"
    base_model_version = "z_image"
    metadata_versions = ("zimage", "zimageturbo")
    layouts_read = ("`lycoris_`, `transformer.` and bare Diffusers paths, `diffusion_model.` with Diffusers or "
                    "original names, kohya `lora_unet_` original names (fused `attention.qkv` as row slices), "
                    "Diffusers/PEFT `lora_A`/`lora_B`; transformer only (no text-encoder keys)")

    def original_path(self, path: str) -> str | None:
        if _QKV.fullmatch(path):
            return None  # a row slice of attention.qkv
        top = _TOP.fullmatch(path)
        if top:
            return top[1] + (top[2] or "")
        for diffusers, original in _RENAMED.items():
            if path.endswith("." + diffusers):
                return path[: -len(diffusers)] + original
        return path

    def fused_slices(self, denoiser: nn.Module) -> dict[str, list[tuple[str, int, int]]]:
        """``<block>.attention.qkv`` -> the block's to_q, to_k, to_v rows, for every block."""
        out = {}
        for path, _ in denoiser.named_modules():
            if re.fullmatch(r"(?:layers|noise_refiner|context_refiner)\.\d+\.attention", path):
                out[f"{path}.qkv"] = stacked(denoiser, [f"{path}.to_{x}" for x in "qkv"])
        return out

    def matches_checkpoint_keys(self, keys) -> bool:
        """A single-file Z-Image transformer (original names): a fused ``noise_refiner`` qkv (Lumina 2 has
        one too) and ``cap_pad_token``, which ComfyUI's detection reads only in its Z-Image branch."""
        names = {k.split("diffusion_model.", 1)[-1] for k in keys}
        return "noise_refiner.0.attention.qkv.weight" in names and "cap_pad_token" in names


FAMILY = ZImageFamily()

"""Flux.2 ([klein] 4B / 9B and [dev]): ``Flux2Transformer2DModel`` in ``Flux2KleinPipeline`` (Qwen3
text encoder) or ``Flux2Pipeline`` (Mistral Small 3). Loaded, not trained, by lokr-diffusion.

The module tree differs from Flux.1's (``families/flux.py``) although many names are shared: the
blocks have no modulation of their own (three global ``*_stream_modulation`` layers), the MLPs are
SwiGLU ``ff.linear_in`` / ``ff.linear_out`` (original ``img_mlp.0`` with 2 x 3H rows, ``img_mlp.2``),
and the single block's ``linear1`` / ``linear2`` are kept fused in Diffusers too
(``attn.to_qkv_mlp_proj`` / ``attn.to_out``). Only the double block's q/k/v are split.

**Layouts ComfyUI accepts** (read in ComfyUI's ``comfy/lora.py`` ``model_lora_keys_unet``: the generic
part and the ``comfy.model_base.Flux`` branch, which ``Flux2`` inherits, with ``comfy/utils.py``
``flux_to_diffusers`` and ``comfy/ldm/flux/model.py``, ``layers.py``, ``model_detection.py``, at
commit 783545f689a0 (v0.33.0, 2026-08-22) of a mirror of ComfyUI's repository (yzkee/ComfyUI)):

================= ===================================================== ==============================
layout            key of ``transformer_blocks.0.attn.to_q``             ComfyUI code
================= ===================================================== ==============================
lycoris           ``lycoris_transformer_blocks_0_attn_to_q``            Flux branch (flux_to_diffusers)
lora_transformer  ``lora_transformer_transformer_blocks_0_attn_to_q``   Flux branch (OneTrainer)
transformer       ``transformer.transformer_blocks.0.attn.to_q``        Flux branch
bare              ``transformer_blocks.0.attn.to_q``                    Flux branch (DiffSynth)
kohya             ``lora_unet_double_blocks_0_img_attn_qkv`` (fused)    generic ``lora_unet_``
diffusion_model   ``diffusion_model.double_blocks.0.img_attn.qkv``      generic dotted original names
================= ===================================================== ==============================

Original names: ``double_blocks.N.{img,txt}_attn.qkv`` (q/k/v rows [0,H), [H,2H), [2H,3H): applied as
row slices) and ``.proj``, ``{img,txt}_mlp.0`` / ``.2``, ``single_blocks.N.linear1`` / ``linear2``,
``img_in``, ``txt_in``, ``time_in`` / ``guidance_in`` ``.in_layer`` / ``.out_layer``,
``double_stream_modulation_img.lin`` / ``_txt.lin``, ``single_stream_modulation.lin``,
``final_layer.linear`` and ``final_layer.adaLN_modulation.1`` (Diffusers' ``norm_out.linear`` with its
(shift, scale) halves swapped, as ComfyUI's ``swap_scale_shift`` and Diffusers'
``convert_flux2_transformer_checkpoint_to_diffusers`` say).

ComfyUI's Diffusers-named map (``flux_to_diffusers``, written for Flux.1 and extended with Flux.2's
``ff.linear_in``, ``attn.to_qkv_mlp_proj``, ``attn.to_out``) has no key for ``time_guidance_embed.*``
and the three modulation layers: in the four Diffusers-named layouts ComfyUI skips those modules
(lokr-diffusion loads them; ``inspect`` says so). Not read: ComfyUI's ``linear1_qkv`` (the first 3H
rows of ``linear1``): Flux.2's Diffusers model keeps ``linear1`` whole, and a key over part of one
layer's rows has no place in the loader yet (reported as unmatched). Text-encoder keys are not read.

**Config**: :data:`FLUX2_KLEIN_TRANSFORMER` is black-forest-labs/FLUX.2-klein-4B's transformer, put
together offline (the published ``config.json`` could not be read here): from ComfyUI's detection of
Flux.2 (head dim 128, mlp ratio 3, rope axes 32 x 4 and theta 2000, 128 latent channels, no biases)
and from independent Klein implementations (5 double and 20 single blocks, 24 heads = 3072 wide, a
text input of 3 x 2560 = 7680 from three Qwen3-4B layers, no guidance embedder in the distilled
model); Diffusers 0.42's defaults (8 / 48 blocks, 48 heads, 15360) are Flux.2 [dev]'s.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from .dit_loading import KeyLayout, LoadingFamily, stacked

__all__ = ["FAMILY", "FLUX2_KLEIN_TRANSFORMER", "Flux2Family"]

FLUX2_KLEIN_TRANSFORMER: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 128,
    "out_channels": None,
    "num_layers": 5,
    "num_single_layers": 20,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 7680,
    "timestep_guidance_channels": 256,
    "mlp_ratio": 3.0,
    "axes_dims_rope": (32, 32, 32, 32),
    "rope_theta": 2000,
    "eps": 1e-6,
    "guidance_embeds": False,
}
TINY_TRANSFORMER = {"num_layers": 2, "num_single_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
                    "joint_attention_dim": 32, "in_channels": 16, "axes_dims_rope": (4, 4, 4, 4)}

_DOUBLE = r"transformer_blocks\.\d+\."
_SINGLE = r"single_transformer_blocks\.\d+\."
_MODULATION = r"(?:double_stream_modulation_(?:img|txt)|single_stream_modulation)"
DIFFUSERS_NAMES = (rf"{_DOUBLE}(?:attn\.(?:to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)|ff(?:_context)?\.linear_(?:in|out))"
                   rf"|{_SINGLE}attn\.(?:to_qkv_mlp_proj|to_out)|{_MODULATION}\.linear"
                   r"|time_guidance_embed\.(?:timestep|guidance)_embedder\.linear_[12]"
                   r"|x_embedder|context_embedder|norm_out\.linear|proj_out")
ORIGINAL_NAMES = (r"double_blocks\.\d+\.(?:img|txt)_(?:attn\.(?:qkv|proj)|mlp\.[02])|single_blocks\.\d+\.linear[12]"
                  rf"|{_MODULATION}\.lin|(?:time|guidance)_in\.(?:in|out)_layer|img_in|txt_in"
                  r"|final_layer\.(?:linear|adaLN_modulation\.1)")
COMFYUI_UNMAPPED = rf"time_guidance_embed\.(?:timestep|guidance)_embedder\.linear_[12]|{_MODULATION}\.linear"

# inside transformer_blocks.N (Diffusers) -> inside double_blocks.N (original)
DOUBLE_BLOCK = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.linear_in": "img_mlp.0",
                "ff.linear_out": "img_mlp.2", "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2"}
SINGLE_BLOCK = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}
OUTSIDE = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
}
DOUBLE_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
FINAL_MODULATION = "final_layer.adaLN_modulation.1"

LAYOUTS = {
    "lycoris": KeyLayout("lycoris_", False, True, "lycoris_<Diffusers path, dots as _>", "SimpleTuner (LyCORIS)"),
    "lora_transformer": KeyLayout("lora_transformer_", False, True, "lora_transformer_<Diffusers path, dots as _>",
                                  "OneTrainer"),
    "transformer": KeyLayout("transformer.", False, False, "transformer.<Diffusers path>",
                             "Diffusers/PEFT LoRA, ai-toolkit"),
    "bare": KeyLayout("", False, False, "<Diffusers path>", "DiffSynth-Studio"),
    "kohya": KeyLayout("lora_unet_", True, True, "lora_unet_<original path, dots as _>, q/k/v fused as qkv",
                       "kohya sd-scripts, musubi-tuner"),
    "diffusion_model": KeyLayout("diffusion_model.", True, False, "diffusion_model.<original path>, fused like kohya",
                                 "generic; ComfyUI's own key names"),
}
_BLOCK_PATH = re.compile(r"(single_)?transformer_blocks\.(\d+)\.(.+)")
# Rows per input of layers whose shapes differ from Flux.1's at any width: (out / in of Flux.2, of Flux.1)
_MLP_IN = re.compile(r"(?:.*[._])?(?:img|txt)_mlp[._]0$|(?:.*[._])?ff(?:_context)?[._]linear_in$")
_LINEAR1 = re.compile(r"(?:.*[._])?single_blocks[._]\d+[._]linear1$|(?:.*[._])?attn[._]to_qkv_mlp_proj$")


class Flux2Family(LoadingFamily):
    name = "flux2"
    title = "Flux.2"
    aliases = ("flux-2", "flux2-klein", "flux-2-klein", "klein")
    pipeline_class = "Flux2KleinPipeline"
    pipeline_classes = ("Flux2Pipeline", "Flux2KleinPipeline", "Flux2KleinInpaintPipeline", "Flux2KleinKVPipeline")
    transformer_class = "Flux2Transformer2DModel"
    config_keys = frozenset({"num_single_layers", "timestep_guidance_channels", "mlp_ratio", "rope_theta"})
    real_transformer = FLUX2_KLEIN_TRANSFORMER
    tiny_transformer = TINY_TRANSFORMER
    key_layouts = LAYOUTS
    diffusers_names = DIFFUSERS_NAMES
    original_names = ORIGINAL_NAMES
    comfyui_unmapped = COMFYUI_UNMAPPED
    text_encoder_title = "Qwen3 ([klein]) or Mistral Small 3 ([dev])"
    architecture = "flux-2/lora"
    base_model_version = "flux2"
    metadata_versions = ("flux2", "flux2klein", "flux2dev")
    attention_width = 3072  # [klein] 4B: 24 heads x 128 ([dev]'s 6144: only its MLP shapes tell)
    layouts_read = ("`lycoris_`, `lora_transformer_`, `transformer.` and bare Diffusers paths, kohya `lora_unet_` and "
                    "`diffusion_model.` original names (fused `qkv` as row slices), Diffusers/PEFT `lora_A`/`lora_B`; "
                    "transformer only (no text-encoder keys)")

    def original_path(self, path: str) -> str | None:
        if path in OUTSIDE:
            return OUTSIDE[path]
        m = _BLOCK_PATH.fullmatch(path)
        if m is None:
            return None  # norm_out.linear: the swapped halves of final_layer.adaLN_modulation.1
        inner = (SINGLE_BLOCK if m[1] else DOUBLE_BLOCK).get(m[3])
        return f"{'single' if m[1] else 'double'}_blocks.{m[2]}.{inner}" if inner else None

    def fused_slices(self, denoiser: nn.Module) -> dict[str, list[tuple[str, int, int]]]:
        out = {}
        for path, _ in denoiser.named_modules():
            m = re.fullmatch(r"transformer_blocks\.(\d+)", path)
            if m:
                for original, paths in DOUBLE_FUSED.items():
                    out[f"double_blocks.{m[1]}.{original}"] = stacked(denoiser, [f"{path}.{p}" for p in paths])
        h = denoiser.get_submodule("norm_out.linear").weight.shape[0] // 2
        out[FINAL_MODULATION] = [("norm_out.linear", h, 2 * h), ("norm_out.linear", 0, h)]
        return out

    def adapter_widths_fit(self, modules: Sequence[tuple[str, str, tuple[int, ...]]]) -> bool | None:
        """Whether the file's MLP-input and ``linear1`` shapes are Flux.2's (SwiGLU, ratio 3: 6H and 9H
        rows for H inputs) rather than Flux.1's (4H and 7H): the names alone are shared by both. Without
        those layers, the attention width ([klein] 4B's, as Flux.1's and Qwen-Image's)."""
        verdicts = set()
        for _, key, shape in modules:
            if len(shape) != 2 or not shape[1]:
                continue
            ratio = shape[0] / shape[1]
            if _MLP_IN.match(key):
                verdicts.add({6.0: True, 4.0: False}.get(ratio))
            elif _LINEAR1.match(key):
                verdicts.add({9.0: True, 7.0: False}.get(ratio))
        verdicts.discard(None)
        return verdicts.pop() if len(verdicts) == 1 else super().adapter_widths_fit(modules)

    def matches_checkpoint_keys(self, keys) -> bool:
        """Original single-file names with Flux.2's global ``double_stream_modulation_img`` (ComfyUI's
        detection key for Flux.2)."""
        return any(k.split("diffusion_model.", 1)[-1].startswith("double_stream_modulation_img.lin.") for k in keys)


FAMILY = Flux2Family()

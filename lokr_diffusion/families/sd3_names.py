"""SD3 / SD3.5 module names: Diffusers paths <-> the original (MMDiT) checkpoint names, and every
file key the adapter tools in the wild write for them (docs: dit-families spec, sections 1 and 2).

Diffusers' SD3Transformer2DModel splits what the original model fuses: the `qkv` projection of
each joint block's image stream (`x_block.attn`), its text stream (`context_block.attn`) and,
in SD3.5 Medium's dual-attention blocks, the second image attention (`x_block.attn2`). A file
keyed by the Diffusers names patches each module 1:1; a file keyed by the original names
(kohya's `lora_unet_joint_blocks_0_x_block_attn_qkv`, `diffusion_model.` dotted) patches a fused
matrix, whose update reaches the Diffusers modules as row slices (:func:`fused_groups`).

Two modulation layers are 1:1 in name but not in row order: the original `adaLN_modulation`
of the final layer and of the last joint block's text stream (which is `context_pre_only`)
split their output as (shift, scale), Diffusers' AdaLayerNormContinuous as (scale, shift).
Diffusers' `convert_sd3_transformer_checkpoint_to_diffusers` and ComfyUI's `mmdit_to_diffusers`
both swap the halves, so those two keys are two-slice fused groups, never 1:1 aliases.

Everything here is a pure function of module paths and the config (H = num_attention_heads x
attention_head_dim, the depth, the dual-attention blocks).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# inside transformer_blocks.N (Diffusers) <-> inside joint_blocks.N (original), 1:1
BLOCK = {
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "attn2.to_out.0": "x_block.attn2.proj",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
    "norm1.linear": "x_block.adaLN_modulation.1",
    "norm1_context.linear": "context_block.adaLN_modulation.1",  # halves swapped in the last block
}
# outside the blocks, 1:1 (`pos_embed.proj` is the 2x2 patch-embedding conv)
OUTSIDE = {
    "pos_embed.proj": "x_embedder.proj",
    "context_embedder": "context_embedder",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "proj_out": "final_layer.linear",
}
# fused original module -> the Diffusers modules stacked in its rows, in order, H rows each
FUSED = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),  # dual-attention blocks only
}
FINAL_MODULATION = "final_layer.adaLN_modulation.1"  # norm_out.linear with its halves swapped
LAST_CONTEXT_MODULATION = "context_block.adaLN_modulation.1"  # in the last block: halves swapped

_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.(.+)")
_ORIGINAL = re.compile(r"joint_blocks\.(\d+)\.(.+)")
_FROM_BLOCK = {v: k for k, v in BLOCK.items()}
_FROM_OUTSIDE = {v: k for k, v in OUTSIDE.items()}


def _config(denoiser: Any) -> Mapping[str, Any]:
    config = getattr(denoiser, "config", denoiser)
    if not isinstance(config, Mapping):
        raise TypeError(f"expected an SD3Transformer2DModel or its config, got {type(denoiser).__name__}")
    return config


def inner_dim(denoiser: Any) -> int:
    """H: the width of both streams and of each of q, k and v."""
    config = _config(denoiser)
    return int(config["num_attention_heads"]) * int(config["attention_head_dim"])


def depth(denoiser: Any) -> int:
    return int(_config(denoiser)["num_layers"])


def dual_attention_blocks(denoiser: Any) -> frozenset[int]:
    """Indices of the blocks with a second image attention (`attn2`): SD3.5 Medium's MMDiT-X."""
    return frozenset(int(i) for i in (_config(denoiser).get("dual_attention_layers") or ()))


def original_path(path: str, denoiser: Any) -> str | None:
    """The original name of a Diffusers module that maps 1:1, or None: the module is a row slice
    of a fused original module (q/k/v, the swapped modulations) or has no counterpart."""
    if path in OUTSIDE:
        return OUTSIDE[path]
    m = _BLOCK.fullmatch(path)
    if not m:
        return None
    inner = BLOCK.get(m[2])
    if inner is None or (int(m[1]) == depth(denoiser) - 1 and inner == LAST_CONTEXT_MODULATION):
        return None
    return f"joint_blocks.{m[1]}.{inner}"


def diffusers_path(original: str, denoiser: Any) -> str | None:
    """The Diffusers path of a 1:1 original module (the inverse of :func:`original_path`)."""
    if original in _FROM_OUTSIDE:
        return _FROM_OUTSIDE[original]
    m = _ORIGINAL.fullmatch(original)
    if not m or (int(m[1]) == depth(denoiser) - 1 and m[2] == LAST_CONTEXT_MODULATION):
        return None
    inner = _FROM_BLOCK.get(m[2])
    return f"transformer_blocks.{m[1]}.{inner}" if inner else None


def diffusers_keys(path: str) -> list[str]:
    """The keys of the five Diffusers-named layouts ComfyUI reads for SD3: SimpleTuner's `lycoris_`,
    OneTrainer's `lora_transformer_`, Diffusers/PEFT's `transformer.` dotted, DiffSynth's bare
    dotted, and `base_model.model.` dotted (flash-sd3 and other PEFT-trained files)."""
    flat = path.replace(".", "_")
    return [f"lycoris_{flat}", f"lora_transformer_{flat}", f"transformer.{path}", path, f"base_model.model.{path}"]


def original_keys(original: str) -> list[str]:
    """The keys of the two original-named layouts: kohya's `lora_unet_` and `diffusion_model.` dotted."""
    return [f"lora_unet_{original.replace('.', '_')}", f"diffusion_model.{original}"]


def key_aliases(path: str, denoiser: Any) -> list[str]:
    """Every key that names the Diffusers module `path` 1:1, over the seven layouts.

    Modules that are row slices of a fused original module get only the Diffusers-named keys;
    their original-named files are :func:`fused_groups`.
    """
    original = original_path(path, denoiser)
    return diffusers_keys(path) + (original_keys(original) if original else [])


def fused_groups(denoiser: Any) -> dict[str, list[tuple[str, int, int]]]:
    """Every file key naming a fused original module -> [(Diffusers path, row start, row stop)].

    The Diffusers module's update is the fused update's rows [start, stop); a path listed twice
    gets its ranges concatenated in list order (the swapped modulations). `denoiser` is the
    SD3Transformer2DModel (or its config): H, the depth and the dual-attention blocks come from it.
    """
    h, n, dual = inner_dim(denoiser), depth(denoiser), dual_attention_blocks(denoiser)
    groups: dict[str, list[tuple[str, int, int]]] = {}

    def add(original: str, slices: list[tuple[str, int, int]]) -> None:
        for key in original_keys(original):
            groups[key] = slices

    swapped = [(h, 2 * h), (0, h)]
    for i in range(n):
        block = f"transformer_blocks.{i}"
        for original, paths in FUSED.items():
            if original.startswith("x_block.attn2.") and i not in dual:
                continue
            add(f"joint_blocks.{i}.{original}", [(f"{block}.{p}", k * h, (k + 1) * h) for k, p in enumerate(paths)])
    add(f"joint_blocks.{n - 1}.{LAST_CONTEXT_MODULATION}",
        [(f"transformer_blocks.{n - 1}.norm1_context.linear", a, b) for a, b in swapped])
    add(FINAL_MODULATION, [("norm_out.linear", a, b) for a, b in swapped])
    return groups


# -- the seven file layouts ComfyUI reads for SD3 (DiT spec, section 2) ------------------------------
# name -> (what a key looks like, who writes it). The first five name the Diffusers modules 1:1
# (in the order of diffusers_keys); the last two the original modules, q/k/v fused as qkv.
LAYOUTS: dict[str, tuple[str, str]] = {
    "lycoris": ("lycoris_<Diffusers path, dots as _>", "SimpleTuner with LyCORIS; what lokr-diffusion writes"),
    "lora_transformer": ("lora_transformer_<Diffusers path, dots as _>", "OneTrainer"),
    "transformer": ("transformer.<Diffusers path>", "Diffusers/PEFT LoRA"),
    "bare": ("<Diffusers path>", "DiffSynth"),
    "base_model": ("base_model.model.<Diffusers path>", "PEFT-trained files (flash-sd3)"),
    "kohya": ("lora_unet_<original path, dots as _>, q/k/v fused as qkv", "kohya sd-scripts"),
    "diffusion_model": ("diffusion_model.<original path>, fused like kohya", "generic; ComfyUI's own key names"),
}
DIFFUSERS_NAMED = ("lycoris", "lora_transformer", "transformer", "bare", "base_model")
ORIGINAL_NAMED = ("kohya", "diffusion_model")
_DIFFUSERS_PATH = re.compile(r"transformer_blocks\.\d+\..+|context_embedder|time_text_embed\..+|norm_out\.linear"
                             r"|proj_out|pos_embed\.proj")
_ORIGINAL_PATH = re.compile(r"joint_blocks\.\d+\..+|final_layer\..+|context_embedder|[txy]_embedder\..+")
_ORIGINAL_FLAT = re.compile(r"joint_blocks_\d+_.+|final_layer_.+|context_embedder|[txy]_embedder_.+")
_FLAT_PREFIXES = (("lycoris_", "lycoris"), ("lora_transformer_", "lora_transformer"))
_DOTTED_PREFIXES = (("base_model.model.", "base_model"), ("transformer.", "transformer"))


def layout_of(key: str) -> str | None:
    """Which of :data:`LAYOUTS` a denoiser module key is in; None for other keys (text encoders,
    other families' names). `lora_unet_` is kohya's only over original names (the Diffusers-path
    form is the PEFT reader's, no layout of its own)."""
    for prefix, name in _FLAT_PREFIXES:
        if key.startswith(prefix):
            return name
    for prefix, name in _DOTTED_PREFIXES:
        if key.startswith(prefix):
            return name if _DIFFUSERS_PATH.fullmatch(key[len(prefix):]) else None
    if key.startswith("lora_unet_"):
        return "kohya" if _ORIGINAL_FLAT.fullmatch(key[len("lora_unet_"):]) else None
    if key.startswith("diffusion_model."):
        return "diffusion_model" if _ORIGINAL_PATH.fullmatch(key[len("diffusion_model."):]) else None
    return "bare" if _DIFFUSERS_PATH.fullmatch(key) else None


def layout_key(layout: str, path: str, denoiser: Any) -> str | None:
    """The key of Diffusers module `path` in `layout`; None when the layout names it only as a
    row slice of a fused module (q/k/v, the swapped modulations)."""
    if layout in DIFFUSERS_NAMED:
        return diffusers_keys(path)[DIFFUSERS_NAMED.index(layout)]
    if layout not in ORIGINAL_NAMED:
        raise ValueError(f"unknown SD3 file layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    original = original_path(path, denoiser)
    return original_keys(original)[ORIGINAL_NAMED.index(layout)] if original else None


__all__ = ["BLOCK", "DIFFUSERS_NAMED", "FINAL_MODULATION", "FUSED", "LAST_CONTEXT_MODULATION", "LAYOUTS",
           "ORIGINAL_NAMED", "OUTSIDE", "depth", "diffusers_keys", "diffusers_path", "dual_attention_blocks",
           "fused_groups", "inner_dim", "key_aliases", "layout_key", "layout_of", "original_keys", "original_path"]

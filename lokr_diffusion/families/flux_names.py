"""Flux.1 module names: Diffusers paths <-> the original (BFL) checkpoint names, and every file
key the adapter tools in the wild write for them (docs: dit-families spec, sections 1 and 2).

Diffusers' FluxTransformer2DModel splits what the original model fuses: the img/txt `qkv`
projections of a double block and the single block's `linear1` (q, k, v and the MLP input in
one matrix). A file keyed by the Diffusers names patches each module 1:1; a file keyed by the
original names (kohya's `lora_unet_double_blocks_0_img_attn_qkv`, `diffusion_model.` dotted)
patches a fused matrix, whose update reaches the Diffusers modules as row slices
(:func:`fused_groups`). The facts were checked against Diffusers' own converters
(`convert_flux_transformer_checkpoint_to_diffusers`, `_convert_kohya_flux_lora_to_diffusers`)
and ComfyUI's `flux_to_diffusers` / `model_lora_keys_unet`.

`norm_out.linear` is 1:1 in name but not in row order: the original final layer splits its
output as (shift, scale), Diffusers' AdaLayerNormContinuous as (scale, shift), and both
converters swap the halves. An update keyed `final_layer.adaLN_modulation.1` is therefore
applied with its halves swapped, as a two-slice fused group, never as a 1:1 alias.

Everything here is a pure function of module paths, except where a row count is needed: those
functions read the inner width H = num_attention_heads * attention_head_dim from the model's
config.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# inside transformer_blocks.N (Diffusers) <-> inside double_blocks.N (original)
DOUBLE_BLOCK = {
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
}
# inside single_transformer_blocks.N <-> inside single_blocks.N
SINGLE_BLOCK = {"proj_out": "linear2", "norm.linear": "modulation.lin"}
# outside the blocks
OUTSIDE = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "proj_out": "final_layer.linear",
}
# fused original module -> the Diffusers modules stacked in its rows, in order, each H rows
# except proj_mlp (MLP_RATIO * H)
DOUBLE_FUSED = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
SINGLE_FUSED = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear1_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),  # ComfyUI: the first 3H rows of linear1
}
FINAL_MODULATION = "final_layer.adaLN_modulation.1"  # norm_out.linear with its halves swapped
MLP_RATIO = 4  # FluxTransformer2DModel builds every single block with mlp_ratio 4.0, as Flux.1 does

_DOUBLE = re.compile(r"transformer_blocks\.(\d+)\.(.+)")
_SINGLE = re.compile(r"single_transformer_blocks\.(\d+)\.(.+)")
_ORIGINAL = re.compile(r"(double|single)_blocks\.(\d+)\.(.+)")


_FROM_ORIGINAL = {"double": ("transformer_blocks", {v: k for k, v in DOUBLE_BLOCK.items()}),
                  "single": ("single_transformer_blocks", {v: k for k, v in SINGLE_BLOCK.items()})}
_FROM_OUTSIDE = {v: k for k, v in OUTSIDE.items()}


def original_path(path: str) -> str | None:
    """The original (BFL) name of a Diffusers module that maps 1:1, or None: the module is a row
    slice of a fused original module (q/k/v, proj_mlp, norm_out.linear) or has no counterpart."""
    if path in OUTSIDE:
        return OUTSIDE[path]
    for pattern, block, table in ((_SINGLE, "single_blocks", SINGLE_BLOCK), (_DOUBLE, "double_blocks", DOUBLE_BLOCK)):
        m = pattern.fullmatch(path)
        if m:
            inner = table.get(m[2])
            return f"{block}.{m[1]}.{inner}" if inner else None
    return None


def diffusers_path(original: str) -> str | None:
    """The Diffusers path of a 1:1 original module (the inverse of :func:`original_path`)."""
    if original in _FROM_OUTSIDE:
        return _FROM_OUTSIDE[original]
    m = _ORIGINAL.fullmatch(original)
    if not m:
        return None
    block, table = _FROM_ORIGINAL[m[1]]
    inner = table.get(m[3])
    return f"{block}.{m[2]}.{inner}" if inner else None


def diffusers_keys(path: str) -> list[str]:
    """The keys of the four Diffusers-named layouts: SimpleTuner's `lycoris_`, OneTrainer's
    `lora_transformer_`, Diffusers/PEFT/ai-toolkit's `transformer.` dotted, DiffSynth's bare dotted."""
    flat = path.replace(".", "_")
    return [f"lycoris_{flat}", f"lora_transformer_{flat}", f"transformer.{path}", path]


def original_keys(original: str) -> list[str]:
    """The keys of the two original-named layouts: kohya's `lora_unet_` and `diffusion_model.` dotted."""
    return [f"lora_unet_{original.replace('.', '_')}", f"diffusion_model.{original}"]


def key_aliases(path: str, denoiser: Any = None) -> list[str]:
    """Every key that names the Diffusers module `path` 1:1, over the six layouts.

    Modules that are row slices of a fused original module get only the four Diffusers-named
    keys; their original-named files are :func:`fused_groups`. `denoiser` is accepted so this
    can stand in for ``Family.denoiser_key_aliases``; 1:1 names do not depend on widths.
    """
    original = original_path(path)
    return diffusers_keys(path) + (original_keys(original) if original else [])


def _config(denoiser: Any) -> Mapping[str, Any]:
    config = getattr(denoiser, "config", denoiser)
    if not isinstance(config, Mapping):
        raise TypeError(f"expected a FluxTransformer2DModel or its config, got {type(denoiser).__name__}")
    return config


def inner_dim(denoiser: Any) -> int:
    """H: the width of the residual stream and of each of q, k and v."""
    config = _config(denoiser)
    return int(config["num_attention_heads"]) * int(config["attention_head_dim"])


def _stacked(block: str, paths: tuple[str, ...], h: int) -> list[tuple[str, int, int]]:
    slices, start = [], 0
    for p in paths:
        rows = MLP_RATIO * h if p == "proj_mlp" else h
        slices.append((f"{block}.{p}", start, start + rows))
        start += rows
    return slices


def fused_groups(denoiser: Any) -> dict[str, list[tuple[str, int, int]]]:
    """Every file key naming a fused original module -> [(Diffusers path, row start, row stop)].

    The Diffusers module's update is the fused update's rows [start, stop); a path listed twice
    gets its ranges concatenated in list order (`norm_out.linear`: the halves swapped).
    `denoiser` is the FluxTransformer2DModel (or its config): H and the block counts come from it.
    """
    config = _config(denoiser)
    h = inner_dim(config)
    groups: dict[str, list[tuple[str, int, int]]] = {}

    def add(original: str, slices: list[tuple[str, int, int]]) -> None:
        for key in original_keys(original):
            groups[key] = slices

    for i in range(int(config["num_layers"])):
        for original, paths in DOUBLE_FUSED.items():
            add(f"double_blocks.{i}.{original}", _stacked(f"transformer_blocks.{i}", paths, h))
    for i in range(int(config["num_single_layers"])):
        for original, paths in SINGLE_FUSED.items():
            add(f"single_blocks.{i}.{original}", _stacked(f"single_transformer_blocks.{i}", paths, h))
    add(FINAL_MODULATION, [("norm_out.linear", h, 2 * h), ("norm_out.linear", 0, h)])
    return groups


# -- the six file layouts of the DiT spec (section 2) ----------------------------------------------
# name -> (what a key looks like, who writes it). The first four name the Diffusers modules 1:1;
# the last two name the original modules, whose q/k/v (and the single block's MLP input) are one
# fused matrix. "kohya" and "lycoris" are also what people call these files.
LAYOUTS: dict[str, tuple[str, str]] = {
    "lycoris": ("lycoris_<Diffusers path, dots as _>", "SimpleTuner with LyCORIS; what lokr-diffusion writes"),
    "lora_transformer": ("lora_transformer_<Diffusers path, dots as _>", "OneTrainer"),
    "transformer": ("transformer.<Diffusers path>", "Diffusers/PEFT LoRA, ai-toolkit"),
    "bare": ("<Diffusers path>", "DiffSynth"),
    "kohya": ("lora_unet_<original path, dots as _>, q/k/v fused as qkv / linear1", "kohya sd-scripts"),
    "diffusion_model": ("diffusion_model.<original path>, fused like kohya", "generic; ComfyUI's own key names"),
}
DIFFUSERS_NAMED = ("lycoris", "lora_transformer", "transformer", "bare")
ORIGINAL_NAMED = ("kohya", "diffusion_model")
_PREFIXES = (("lycoris_", "lycoris"), ("lora_transformer_", "lora_transformer"), ("transformer.", "transformer"),
             ("lora_unet_", "kohya"), ("diffusion_model.", "diffusion_model"))
_BARE = re.compile(r"(single_)?transformer_blocks\.\d+\..+|x_embedder|context_embedder|time_text_embed\..+"
                   r"|norm_out\.linear|proj_out")


def layout_of(key: str) -> str | None:
    """Which of :data:`LAYOUTS` a denoiser module key is in (None: no Flux denoiser key, e.g. a
    text-encoder key). Decided by the prefix alone; a bare key must be a Diffusers module path."""
    for prefix, name in _PREFIXES:
        if key.startswith(prefix):
            return name
    return "bare" if _BARE.fullmatch(key) else None


def layout_key(layout: str, path: str) -> str | None:
    """The key of Diffusers module `path` in `layout`; None when the layout has no key of its own
    for it (a q/k/v, proj_mlp or norm_out.linear slice of a fused original module)."""
    if layout in DIFFUSERS_NAMED:
        return diffusers_keys(path)[DIFFUSERS_NAMED.index(layout)]
    if layout not in ORIGINAL_NAMED:
        raise ValueError(f"unknown Flux file layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    original = original_path(path)
    return original_keys(original)[ORIGINAL_NAMED.index(layout)] if original else None


__all__ = ["DIFFUSERS_NAMED", "DOUBLE_BLOCK", "DOUBLE_FUSED", "FINAL_MODULATION", "LAYOUTS", "MLP_RATIO",
           "ORIGINAL_NAMED", "OUTSIDE", "SINGLE_BLOCK", "SINGLE_FUSED",
           "diffusers_keys", "diffusers_path", "fused_groups", "inner_dim", "key_aliases", "layout_key", "layout_of",
           "original_keys", "original_path"]

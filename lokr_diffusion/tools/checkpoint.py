"""A Diffusers pipeline as one original-layout ("CompVis"/ldm/sgm) checkpoint, the file UIs load.

diffusers 0.42 only converts the other way (`from_single_file`), so the mapping lives here:
the UNet through `naming.diffusers_to_ldm` (the block table the adapter keys use too), the VAE
and the text encoders by the fixed tables below. Prefixes: `model.diffusion_model.` (UNet),
`first_stage_model.` (VAE), `cond_stage_model.transformer.` (SD1 CLIP),
`cond_stage_model.model.` (SD2 OpenCLIP), `conditioner.embedders.0.transformer.` and
`conditioner.embedders.1.model.` (SDXL; each family lists its own in ``checkpoint_text_prefixes``
and calls these converters from ``Family.to_original``). OpenCLIP fuses q, k, v into one in_proj and stores
its text projection transposed.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import ModelError
from ..naming import diffusers_to_ldm, text_encoder_path, unet_layout

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPENCLIP_LAYER = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                   ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj"))
_OPENCLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}


def unet_to_original(state_dict: Mapping[str, torch.Tensor], unet: Any) -> dict[str, torch.Tensor]:
    layout = unet_layout(unet)
    out = {}
    for key, t in state_dict.items():
        ldm = diffusers_to_ldm(key, *layout)
        if ldm is None:
            raise ModelError(f"UNet weight {key} has no original-layout name; cannot write a single-file checkpoint")
        out[UNET_PREFIX + ldm] = t
    return out


def _vae_key(key: str, num_up_blocks: int) -> str:
    """Diffusers AutoencoderKL name -> ldm name; the decoder's up blocks run in reverse order."""
    key = key.replace("conv_norm_out", "norm_out")
    m = re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
    if m:
        part, kind, i, sub, j, rest = m.groups()
        i = int(i) if kind == "down" else num_up_blocks - 1 - int(i)
        if sub == "resnets":
            head, _, tail = rest.partition(".")
            return f"{part}.{kind}.{i}.block.{j}.{_VAE_RESNET.get(head, head)}.{tail}"
        return f"{part}.{kind}.{i}.{'downsample' if kind == 'down' else 'upsample'}.{rest}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        part, sub, j, rest = m.groups()
        if sub == "resnets":
            head, _, tail = rest.partition(".")
            return f"{part}.mid.block_{int(j) + 1}.{_VAE_RESNET.get(head, head)}.{tail}"
        for src, dst in _VAE_ATTN.items():
            if rest.startswith(src + "."):
                return f"{part}.mid.attn_1.{dst}{rest[len(src):]}"
    return key


def vae_to_original(state_dict: Mapping[str, torch.Tensor], vae: Any) -> dict[str, torch.Tensor]:
    """The VAE's mid-block attention is a Linear in Diffusers and a 1x1 conv in the original."""
    n_up = len(vae.config.up_block_types)
    out = {}
    for key, t in state_dict.items():
        ldm = _vae_key(key, n_up)
        if ".mid.attn_1." in ldm and ldm.endswith(".weight") and t.dim() == 2:
            t = t.reshape(*t.shape, 1, 1)
        out[VAE_PREFIX + ldm] = t
    return out


def clip_to_original(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """CLIP-L keeps the transformers names, always under `text_model.`."""
    return {prefix + text_encoder_path(k): t for k, t in state_dict.items() if not k.endswith("position_ids")}


def openclip_to_original(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """transformers CLIP names -> OpenCLIP names, q/k/v fused into in_proj."""
    sd = {text_encoder_path(k) if not k.startswith("text_projection") else k: t for k, t in state_dict.items()
          if not k.endswith("position_ids")}
    out = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        if key in _OPENCLIP_TOP:
            out[prefix + _OPENCLIP_TOP[key]] = t
            continue
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = t.T.contiguous()
            continue
        m = re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", key)
        if m is None:
            raise ModelError(f"text encoder weight {key} has no OpenCLIP name")
        block, rest = f"transformer.resblocks.{m[1]}", m[2]
        qkv = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
        if qkv:
            fused.setdefault(f"{block}.attn.in_proj_{qkv[2]}", {})[qkv[1]] = t
            continue
        for src, dst in _OPENCLIP_LAYER:
            if rest.startswith(src + "."):
                rest = dst + rest[len(src):]
                break
        out[f"{prefix}{block}.{rest}"] = t
    for key, parts in fused.items():
        out[prefix + key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out

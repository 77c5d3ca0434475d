"""Module path <-> file key, in one place for the writer and every reader.

A file key is `<prefix>_<module path with '.' -> '_'>`. UNet paths are diffusers paths for
SD1/SD2 and the original (ldm) paths for SDXL, as sd-scripts writes them; CLIP text-encoder
paths always contain `text_model_`, whatever the transformers version calls the module. Which
of these helpers a family uses is the family's (`Family.denoiser_key`, `Family.text_encoder_key`).
"""
from __future__ import annotations

import re

UNET_PREFIX = "lora_unet"
LYCORIS_PREFIX = "lycoris"

_RESNET_LDM = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}
_TOP_LDM = {
    "conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0",
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
}


def text_encoder_prefixes(num_text_encoders: int) -> list[str]:
    """Prefix of each text encoder in order: SD1/2 `lora_te`, SDXL `lora_te1`, `lora_te2`."""
    if num_text_encoders == 1:
        return ["lora_te"]
    return [f"lora_te{i + 1}" for i in range(num_text_encoders)]


def module_key(prefix: str, path: str) -> str:
    return f"{prefix}_{path.replace('.', '_')}"


def text_encoder_path(path: str) -> str:
    """The module path as the file names it: always under `text_model.`."""
    return path if path.startswith("text_model.") else f"text_model.{path}"


def _resnet_part(rest: str) -> str:
    head, _, tail = rest.partition(".")
    mapped = _RESNET_LDM.get(head)
    if mapped is None:
        raise KeyError(rest)
    return f"{mapped}.{tail}" if tail else mapped


def diffusers_to_ldm(path: str, layers_per_block: int = 2, up_blocks_with_attention: frozenset[int] | set[int] = frozenset()) -> str | None:
    """The original (ldm/sgm) UNet path of a diffusers UNet2DConditionModel path, or None.

    The block numbering follows from layers_per_block L: down block i, layer j is input block
    i*(L+1)+j+1 and its downsampler (i+1)*(L+1); up block i, layer j is output block i*(L+1)+j
    and its upsampler sits in output block i*(L+1)+L, at index 2 when the block has attentions.
    """
    for src, dst in _TOP_LDM.items():
        if path == src or path.startswith(src + "."):
            return dst + path[len(src):]
    n = layers_per_block + 1
    try:
        m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path)
        if m:
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            block = f"input_blocks.{i * n + j + 1}"
            return f"{block}.0.{_resnet_part(rest)}" if kind == "resnets" else f"{block}.1.{rest}"
        m = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv(.*)", path)
        if m:
            return f"input_blocks.{(int(m[1]) + 1) * n}.0.op{m[2]}"
        m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path)
        if m:
            kind, j, rest = m[1], int(m[2]), m[3]
            return f"middle_block.{2 * j}.{_resnet_part(rest)}" if kind == "resnets" else f"middle_block.{2 * j + 1}.{rest}"
        m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", path)
        if m:
            i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            block = f"output_blocks.{i * n + j}"
            return f"{block}.0.{_resnet_part(rest)}" if kind == "resnets" else f"{block}.1.{rest}"
        m = re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv(.*)", path)
        if m:
            i = int(m[1])
            slot = 2 if i in up_blocks_with_attention else 1
            return f"output_blocks.{i * n + layers_per_block}.{slot}.conv{m[2]}"
    except KeyError:
        return None
    return None


def unet_layout(unet) -> tuple[int, frozenset[int]]:
    """(layers_per_block, indices of up blocks with attentions) of a diffusers UNet."""
    lpb = unet.config.layers_per_block
    lpb = int(lpb if isinstance(lpb, int) else lpb[0])
    with_attn = frozenset(i for i, blk in enumerate(unet.up_blocks) if getattr(blk, "attentions", None))
    return lpb, with_attn


def unet_key(path: str, ldm_names: bool, layout: tuple[int, frozenset[int]]) -> str:
    """The key sd-scripts writes for a UNet module: ldm names for SDXL, diffusers names otherwise."""
    if ldm_names:
        ldm = diffusers_to_ldm(path, *layout)
        if ldm is None:
            raise ValueError(f"UNet module {path!r} has no original-layout (ldm) name")
        return module_key(UNET_PREFIX, ldm)
    return module_key(UNET_PREFIX, path)


def unet_key_aliases(path: str, layout: tuple[int, frozenset[int]]) -> list[str]:
    """Every key readers in the wild use for a UNet module (diffusers, ldm and lycoris_ styles)."""
    keys = [module_key(UNET_PREFIX, path), module_key(LYCORIS_PREFIX, path)]
    ldm = diffusers_to_ldm(path, *layout)
    if ldm is not None:
        keys.append(module_key(UNET_PREFIX, ldm))
    return keys


def text_encoder_key(prefix: str, path: str) -> str:
    return module_key(prefix, text_encoder_path(path))


def text_encoder_key_aliases(index: int, num_text_encoders: int, path: str) -> list[str]:
    """Keys for a text-encoder module: with and without `text_model_`, and for a single text
    encoder also the `lora_te1_` prefix some trainers write."""
    prefixes = [text_encoder_prefixes(num_text_encoders)[index]]
    if num_text_encoders == 1:
        prefixes.append("lora_te1")
    inner = path[len("text_model."):] if path.startswith("text_model.") else path
    return [module_key(p, x) for p in prefixes for x in (f"text_model.{inner}", inner)]

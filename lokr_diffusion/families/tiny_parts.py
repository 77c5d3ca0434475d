"""Small random parts that several families' tiny pipelines share: the DiT families' 16-channel
VAE and the CLIP settings that match a locally made tokenizer."""
from __future__ import annotations

from typing import Any

from torch import nn

from .stable_diffusion import TINY_TEXT


def tiny_clip_config(tokenizer: Any) -> dict[str, Any]:
    """TINY_TEXT widths, the tokenizer's vocabulary and its end token (CLIP pools at it),
    projection 32; merge over a real CLIP config to keep its activation and norms."""
    bos, eos = tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
    return {**TINY_TEXT, "vocab_size": len(tokenizer.get_vocab()), "bos_token_id": bos, "eos_token_id": eos,
            "pad_token_id": eos, "projection_dim": 32}


def tiny_latent16_vae(scaling_factor: float, shift_factor: float) -> nn.Module:
    """The Flux / SD3 VAE layout (16 latent channels, no quant convs, four levels = 8x) at small
    widths, with the family's latent scale and shift."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=8, sample_size=64,
        scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=False,
        use_post_quant_conv=False, force_upcast=True)

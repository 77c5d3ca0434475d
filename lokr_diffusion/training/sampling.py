"""Sample images during training: fixed prompts and seeds, one PNG grid per prompt and step.

Prompts may carry their own settings (kohya's `--n --w --h --s --l --d`, parsed in
training/prompts.py); what a prompt does not set comes from the `[sample]` section.
"""
from __future__ import annotations

import re
from pathlib import Path
from collections.abc import Callable, Mapping
from typing import Any, Sequence

import numpy as np
import torch
from diffusers.utils import make_image_grid
from PIL import Image

from ..fileformat import atomic_write_bytes
from .prompts import SamplePrompt


def _slug(prompt: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:limit] or "prompt"


def save_png(image: Image.Image, path: Path) -> Path:
    """Write `image` as PNG atomically, so an interrupted run never leaves a truncated grid."""
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def size_multiple(pipe: Any, family: Any) -> int:
    """What sample widths and heights must be multiples of for `pipe`: the VAE's downscale, twice
    that for a flow family (Flux packs 2x2 latent patches, SD3 patches 2x2)."""
    scale = int(getattr(pipe, "vae_scale_factor", None) or getattr(family, "vae_scale_factor", 8))
    return scale * (2 if getattr(family, "objective", "noise") == "flow" else 1)


@torch.no_grad()
def sample_grids(pipe, prompts: Sequence[str | SamplePrompt], out_dir: Path, step: int, *, negative_prompt: str = "",
                 steps: int = 20, guidance_scale: float = 7.0, seed: int = 0, num_images: int = 2,
                 width: int | None = None, height: int | None = None, device: torch.device | None = None,
                 autocast=None, encode_prompt: Callable[[str], Mapping[str, torch.Tensor]] | None = None
                 ) -> list[tuple[str, Path, np.ndarray]]:
    """Generate `num_images` images per prompt (seeds seed, seed+1, ...), save one grid each.

    A `SamplePrompt`'s own negative prompt, size, steps, guidance scale and seed replace the
    keyword arguments for that prompt (its images use seeds d, d+1, ...).

    The global RNG is left untouched, so sampling does not change the training run (resumed
    runs stay identical to uninterrupted ones). With `encode_prompt` (text -> the family's
    prompt-embedding dict), the pipeline gets those embeddings for the prompt and the negative
    prompt instead of the text, so samples read prompts exactly as training does (clip_skip).
    Returns (prompt, path, grid as HWC uint8).
    """
    out = []
    device = device or pipe.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i, item in enumerate(prompts):
            p = item if isinstance(item, SamplePrompt) else SamplePrompt(item)
            prompt = p.prompt
            negative = p.negative_prompt if p.negative_prompt is not None else negative_prompt
            first_seed = p.seed if p.seed is not None else seed
            text = {"prompt": prompt, "negative_prompt": negative or None}
            if encode_prompt is not None:
                text = {**encode_prompt(prompt), **{f"negative_{k}": v for k, v in encode_prompt(negative).items()}}
            images = []
            for k in range(num_images):
                g = torch.Generator(device=device).manual_seed(first_seed + k)
                with autocast() if autocast is not None else torch.autocast(device.type, enabled=False):
                    result = pipe(**text, num_inference_steps=p.steps if p.steps is not None else steps,
                                  guidance_scale=p.guidance_scale if p.guidance_scale is not None else guidance_scale,
                                  generator=g, width=p.width if p.width is not None else width,
                                  height=p.height if p.height is not None else height)
                images.extend(result.images)
            grid = make_image_grid(images, rows=1, cols=len(images))  # one row, every image the same size
            path = save_png(grid, out_dir / f"step{step:06d}-{i:02d}-{_slug(prompt)}.png")
            out.append((prompt, path, np.asarray(grid)))
    return out

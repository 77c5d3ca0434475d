"""Loss masks: which pixels of a training image count in the loss, and how much.

A mask is read either from the image's own alpha channel (`alpha_mask = true`) or from a
same-named image in a separate folder (`conditioning_data_dir`), as kohya's sd-scripts does:
white (or opaque) trains fully, black (or transparent) not at all, grey in proportion. The mask
takes the image's resize, crop and flip, and is reduced to the latent grid by area averaging
(`mask_to_latent_size`), so a latent cell counts by the share of its pixels that are masked in.

Masks are checked when the dataset is scanned: a missing mask file, one of another size than its
image, or one that cannot be read stops the run with a message naming both files.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import DatasetError
from .images import DEFAULT_MAX_IMAGE_PIXELS, IMAGE_EXTENSIONS, BadImageError, probe_image


def mask_to_latent_size(mask: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """(B, 1, H, W) pixel mask -> (B, 1, h, w), each cell the mean of the pixels it covers
    (area interpolation, as kohya reduces its masks); unchanged when already that size."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask, size=tuple(size), mode="area")


def mask_candidates(image: Path, root: Path, mask_dir: Path) -> list[Path]:
    """Where the mask of `image` may be: its path relative to the dataset folder `root`, under
    `mask_dir`, with its own extension or any other image extension."""
    try:
        rel = image.relative_to(root)
    except ValueError:
        rel = Path(image.name)
    base = mask_dir / rel
    names = [base, *(base.with_suffix(ext) for ext in IMAGE_EXTENSIONS)]
    return list(dict.fromkeys(names))


def find_mask(image: Path, image_size: tuple[int, int], root: Path, mask_dir: Path, *,
              max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[Path, str]:
    """(mask path, content hash) of `image`'s mask in `mask_dir`, checked to be a readable image
    of the same size (after EXIF orientation); DatasetError naming both files otherwise."""
    found: list[Path] = []
    for candidate in mask_candidates(image, root, mask_dir):
        if candidate.is_file() and not any(candidate.samefile(f) for f in found):
            found.append(candidate)
    if not found:
        names = ", ".join(p.name for p in mask_candidates(image, root, mask_dir))
        raise DatasetError(f"image {image} has no mask: expected one of {names} in "
                           f"{mask_candidates(image, root, mask_dir)[0].parent} (conditioning_data_dir)")
    if len(found) > 1:
        raise DatasetError(f"image {image} has {len(found)} masks: {', '.join(str(p) for p in found)}; "
                           f"keep one")
    mask = found[0]
    try:
        info = probe_image(mask, max_pixels=max_pixels)
    except BadImageError as exc:
        raise DatasetError(f"mask {mask} of image {image}: {exc}") from None
    if (info.width, info.height) != tuple(image_size):
        raise DatasetError(f"mask {mask} is {info.width}x{info.height} but its image {image} is "
                           f"{image_size[0]}x{image_size[1]}: a mask must have its image's size")
    return mask, info.sha256


def mask_identity(kind: str, content_sha256: str | None = None) -> str:
    """The part of a latent cache key that names a mask: "alpha" (the image's hash already
    covers its alpha channel) or the mask file's content hash."""
    if kind == "alpha":
        return "alpha"
    assert content_sha256 is not None
    return "file:" + content_sha256

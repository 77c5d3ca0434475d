"""Safe image reading: every way a file can be bad becomes one `BadImageError` with a reason.

Images are decoded fully when the dataset is scanned (not only their headers) so a truncated
file is found before training starts, not on step 40 000. Conversion to RGB is explicit per
mode because PIL's default conversions lose information silently (16-bit images turn white,
transparent pixels turn black).
"""
from __future__ import annotations

import hashlib
import io
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .files import UnreadableFileError, read_regular_file

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

#: Images with more pixels than this are treated as decompression bombs (PIL's own default).
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485

#: Image files larger than this are skipped before being read: the largest legitimate image under
#: the pixel cap (an uncompressed 32-bit BMP of DEFAULT_MAX_IMAGE_PIXELS) is about 342 MiB.
DEFAULT_MAX_IMAGE_BYTES = 512 << 20

# EXIF orientations 5-8 rotate by 90 degrees, swapping width and height.
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_EXIF_ORIENTATION_TAG = 0x0112
_TRUNCATED_FLAG_LOCK = threading.Lock()


class BadImageError(Exception):
    """A file that cannot be used as a training image; str(exc) is the reason."""


@dataclass(frozen=True)
class ImageInfo:
    """What the scan learns about a usable image."""

    width: int  # after EXIF orientation
    height: int
    sha256: str  # of the file's bytes: the cache key's notion of "same image"
    has_alpha: bool = False  # transparency to use as a loss mask (`alpha_mask`)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def read_bytes(path: Path, max_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES) -> bytes:
    """The file's bytes, or BadImageError; one place so every read error reads the same.

    Only regular files are read (a FIFO or a link to /dev/zero named `x.png` would block or never
    end), and at most `max_bytes` of them, so one odd file cannot hang or exhaust the scan.
    """
    try:
        return read_regular_file(path, max_bytes=max_bytes)
    except UnreadableFileError as exc:
        raise BadImageError(str(exc)) from None


def _open(data: bytes, max_pixels: int | None) -> Image.Image:
    if not data:
        raise BadImageError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL only warns between its limit and twice its limit; we want one clear decision.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImageError("not an image (unrecognised format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImageError(f"decompression bomb: {exc}") from None
    except Exception as exc:  # PIL raises many types for malformed headers
        raise BadImageError(f"cannot decode header: {exc}") from None
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        raise BadImageError(f"decompression bomb: {w}x{h} = {w * h} pixels is more than the limit of "
                            f"{max_pixels}")
    if img.format not in ("PNG", "JPEG", "WEBP", "BMP", "MPO"):
        raise BadImageError(f"unsupported format {img.format} (expected PNG, JPEG, WebP or BMP)")
    return img


def _load_strict(img: Image.Image) -> None:
    if not ImageFile.LOAD_TRUNCATED_IMAGES:
        img.load()
        return
    # Someone enabled PIL's global "pad truncated images with grey"; training data must fail
    # instead, so switch it off for this decode only (rare path, hence the simple lock).
    with _TRUNCATED_FLAG_LOCK:
        previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            img.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _decode(img: Image.Image) -> None:
    try:
        _load_strict(img)
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        text = str(exc)
        if "truncated" in text or "broken data stream" in text or isinstance(exc, EOFError):
            raise BadImageError(f"truncated or corrupt image data ({text or type(exc).__name__})") from None
        raise BadImageError(f"cannot decode: {text or type(exc).__name__}") from None


def _oriented_size(img: Image.Image) -> tuple[int, int]:
    w, h = img.size
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:
        orientation = 1
    return (h, w) if orientation in _SWAPPING_ORIENTATIONS else (w, h)


def probe_image(path: Path, *, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                verify: bool = True) -> ImageInfo:
    """Size (after EXIF orientation) and content hash of a usable image, or BadImageError.

    With `verify` the pixels are decoded once, which is what catches truncated files.
    """
    data = read_bytes(path)
    img = _open(data, max_pixels)
    if verify:
        _decode(img)
    w, h = _oriented_size(img)
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    return ImageInfo(width=w, height=h, sha256=hashlib.sha256(data).hexdigest(), has_alpha=has_alpha)


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """An RGB copy of `img`, with transparency composited onto `background` and high bit-depth
    modes scaled (not clipped) to 8 bits."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    elif mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        if mode == "I" and arr.max(initial=0) <= 255:
            scaled = arr  # 8-bit data stored in a 32-bit mode
        else:
            scaled = arr / 257.0  # 0..65535 -> 0..255
        grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([grey] * 3, axis=-1))
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
        grey = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([grey] * 3, axis=-1))
    # L, 1, CMYK, YCbCr, LAB, HSV: PIL's conversions are right for these
    return img.convert("RGB")


def load_rgb(path: Path, *, background: tuple[int, int, int] = (255, 255, 255),
             max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """The image as training sees it: decoded, EXIF orientation applied, RGB."""
    img = _open(read_bytes(path), max_pixels)
    _decode(img)
    img = ImageOps.exif_transpose(img)
    return to_rgb(img, background)


def alpha_of(img: Image.Image) -> Image.Image | None:
    """The transparency of `img` as an "L" image (0 transparent, 255 opaque), or None when the
    image has none: modes with an alpha band, and palette or RGB images with a transparent colour."""
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        return img.convert("RGBA").getchannel("A")
    return None


def load_rgb_alpha(path: Path, *, background: tuple[int, int, int] = (255, 255, 255),
                   max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[Image.Image, Image.Image | None]:
    """`load_rgb` and the image's alpha channel (`alpha_of`) from one decode: the alpha is the
    loss mask of `alpha_mask` datasets, and must come from the same oriented pixels."""
    img = _open(read_bytes(path), max_pixels)
    _decode(img)
    img = ImageOps.exif_transpose(img)
    return to_rgb(img, background), alpha_of(img)


def load_grey(path: Path, *, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """A mask image as an "L" image: its grey level, or the red channel of a colour image (what
    kohya's masked loss reads); transparent pixels count as black."""
    img = _open(read_bytes(path), max_pixels)
    _decode(img)
    img = ImageOps.exif_transpose(img)
    if img.mode == "L":
        return img
    return to_rgb(img, (0, 0, 0)).getchannel("R")


def resize_and_crop(img: Image.Image, resized: tuple[int, int], crop_top_left: tuple[int, int],
                    size: tuple[int, int], flip: bool = False) -> Image.Image:
    """Scale to `resized` (w, h), cut a `size` (w, h) window at `crop_top_left` (top, left),
    mirror if asked. Geometry is decided by `buckets.plan_crop`, not here."""
    if img.size != resized:
        img = img.resize(resized, Image.Resampling.LANCZOS)
    top, left = crop_top_left
    img = img.crop((left, top, left + size[0], top + size[1]))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def mask_to_tensor(img: Image.Image) -> torch.Tensor:
    """(1, H, W) float32 in [0, 1] from an "L" mask image: 255 trains fully, 0 not at all."""
    arr = np.asarray(img, dtype=np.float32)[None] / np.float32(255.0)
    return torch.from_numpy(np.ascontiguousarray(arr))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1], the range Stable Diffusion's VAE expects."""
    # numpy, not torch ops: this runs once per sample, often in DataLoader workers, where
    # torch's intra-op thread pool only adds contention.
    chw = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / np.float32(127.5) - np.float32(1.0)
    return torch.from_numpy(np.ascontiguousarray(chw))

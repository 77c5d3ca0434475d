"""Read a toy image back into words: which shape, where, in which colours.

Why a pixel detector and not a learned classifier: it has no weights to ship or retrain, and
every decision can be explained from the image (this mask overlapped the cross template by
0.8). It relies only on what the generator guarantees: one flat shape of fixed size on a
flat background.

How an image is read:
1. background = median colour of a 3-pixel border (shapes never reach it);
2. foreground = pixels nearer a second colour than the background (two-means seeded by the
   pixels farther than 60/255 from the background); its colour = their median;
3. the foreground mask is compared by intersection over union (IoU) with the silhouette of
   every shape at 0.85, 1 and 1.15 times the generator's size (crosses also with fatter arms),
   centred at every 2-pixel step across the image and at the five caption positions;
4. the shape is the cross when the largest blob is clearly concave (solidity, its area over
   its convex hull's, at most `MAX_CROSS_SOLIDITY`: a cross is ~0.7, circles, squares and
   triangles are above 0.86 even blurred) *and* a cross silhouette overlaps it with IoU at
   least `MIN_IOU`; otherwise it is the best-overlapping circle, square or triangle. IoU alone
   is not enough: a small model rounds a cross's notches, and a rounded plus overlaps a circle
   almost as well as a cross. The best match also gives the centre, whose nearest caption
   position names the place;
5. colours are named by the nearest palette colour.

A concept detection is a reading of the cross (so a concave blob that looks like no cross,
or a convex one, is never credited to the concept).
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from . import generator as gen

__all__ = ["MAX_CROSS_SOLIDITY", "MIN_IOU", "Reading", "concept_rate", "is_concept", "read_image", "read_images",
           "solidity", "validate", "vae_roundtrip"]

MIN_IOU = 0.5
_BORDER = 3
_SEED_DISTANCE = 60.0
_GRID_STEP = 2
_SCALES = (0.85, 1.0, 1.15)  # a model's shapes are rarely exactly the generator's size
_CROSS_ARMS = (gen.CROSS_ARM, 0.4)  # and blur fattens a cross's thin arms
MAX_CROSS_SOLIDITY = 0.82
_PALETTE_NAMES = list(gen.COLOURS)
_PALETTE = np.array([gen.COLOURS[c] for c in _PALETTE_NAMES], dtype=np.float32)


@dataclass(frozen=True)
class Reading:
    shape: str  # one of generator.SHAPES, or "none" when nothing stands out from the background
    iou: float
    position: str
    centre: tuple[float, float]
    colour: str
    background: str
    solidity: float = 1.0  # area / convex hull area of the largest blob: ~1 convex, ~0.7 a cross

    def to_dict(self) -> dict:
        return asdict(self)


@functools.cache
def _templates(size: int = gen.IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray, list[tuple[str, float, float]]]:
    """(masks (T, size*size) float32, areas (T,), (shape, cx, cy) per template)."""
    margin = int(np.ceil(gen.RADIUS)) - 2
    grid = np.arange(margin, size - margin + 1, _GRID_STEP, dtype=np.float64)
    centres = [(float(cx), float(cy)) for cy in grid for cx in grid]
    centres += [gen.position_centre(p, size) for p in gen.POSITIONS]  # exact, off the grid
    masks, labels = [], []
    for shape in gen.SHAPES:
        arms = _CROSS_ARMS if shape == gen.CONCEPT_SHAPE else (gen.CROSS_ARM,)
        for arm in arms:
            for scale in _SCALES:
                for cx, cy in centres:
                    masks.append(gen.shape_mask(shape, cx, cy, size, gen.RADIUS * scale, arm).reshape(-1))
                    labels.append((shape, cx, cy))
    stacked = np.stack(masks).astype(np.float32)
    return stacked, stacked.sum(axis=1), labels


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The biggest 4-connected blob, so a stray speck cannot stretch the convex hull."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    best_label, best_size, current = 0, 0, 0
    h, w = mask.shape
    for y, x in zip(*np.nonzero(mask)):
        if labels[y, x]:
            continue
        current += 1
        labels[y, x] = current
        stack, size = [(y, x)], 0
        while stack:
            cy, cx = stack.pop()
            size += 1
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if size > best_size:
            best_label, best_size = current, size
    return labels == best_label


def _hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of integer (x, y) points: monotone chain, then the shoelace formula."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return 0.0

    def turn(o, a, b) -> int:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list = []
    upper: list = []
    for p in pts:
        while len(lower) >= 2 and turn(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and turn(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = lower[:-1] + upper[:-1]
    return 0.5 * abs(sum(hull[i][0] * hull[i - 1][1] - hull[i - 1][0] * hull[i][1] for i in range(len(hull))))


def solidity(mask: np.ndarray) -> float:
    """Area over convex hull area of the largest blob (pixels as unit squares): 1 for a square,
    ~0.95 for a blurred circle or triangle, ~0.7 for the cross, whose four notches are empty."""
    blob = _largest_component(mask)
    ys, xs = np.nonzero(blob)
    if len(xs) == 0:
        return 1.0
    corners = np.concatenate([np.stack([xs + dx, ys + dy], axis=1) for dx in (0, 1) for dy in (0, 1)])
    return float(blob.sum() / max(_hull_area(corners), 1.0))


def _nearest_colour(rgb: np.ndarray) -> str:
    return _PALETTE_NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(axis=1)))]


def _nearest_position(cx: float, cy: float, size: int) -> str:
    def dist(name: str) -> float:
        px, py = gen.position_centre(name, size)
        return (px - cx) ** 2 + (py - cy) ** 2

    return min(gen.POSITIONS, key=dist)


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if arr.shape != (gen.IMAGE_SIZE, gen.IMAGE_SIZE, 3):
        raise ValueError(f"expected a {gen.IMAGE_SIZE}x{gen.IMAGE_SIZE} RGB image, got shape {arr.shape}")
    return arr


def _foreground(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mask, foreground colour, background colour)."""
    border = np.concatenate([arr[:_BORDER].reshape(-1, 3), arr[-_BORDER:].reshape(-1, 3),
                             arr[:, :_BORDER].reshape(-1, 3), arr[:, -_BORDER:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    far = np.linalg.norm(arr - bg, axis=-1) > _SEED_DISTANCE
    if not far.any():
        return far, bg, bg
    fg = np.median(arr[far], axis=0)
    mask = np.linalg.norm(arr - fg, axis=-1) < np.linalg.norm(arr - bg, axis=-1)
    if mask.any():
        fg = np.median(arr[mask], axis=0)
    return mask, fg, bg


def read_image(image: Image.Image | np.ndarray) -> Reading:
    """What one 64x64 toy image shows, by the rules in the module docstring."""
    return read_images([image])[0]


def read_images(images: Iterable[Image.Image | np.ndarray]) -> list[Reading]:
    """`read_image` for many images, matching all their masks against the templates at once."""
    arrays = [_as_array(im) for im in images]
    if not arrays:
        return []
    size = gen.IMAGE_SIZE
    masks, areas, labels = _templates(size)
    parts = [_foreground(a) for a in arrays]
    m = np.stack([p[0].reshape(-1) for p in parts]).astype(np.float32)  # (N, P)
    inter = m @ masks.T  # (N, T)
    union = m.sum(axis=1, keepdims=True) + areas[None, :] - inter
    iou = inter / np.maximum(union, 1.0)
    is_cross = np.array([lab[0] == gen.CONCEPT_SHAPE for lab in labels])
    best_cross = np.where(is_cross[None, :], iou, -1.0).argmax(axis=1)
    best_base = np.where(is_cross[None, :], -1.0, iou).argmax(axis=1)
    out = []
    for i, (mask, fg, bg) in enumerate(parts):
        background = _nearest_colour(bg)
        if not mask.any():
            out.append(Reading("none", 0.0, "center", (size / 2, size / 2), background, background))
            continue
        solid = solidity(mask)
        concave = solid <= MAX_CROSS_SOLIDITY and iou[i, best_cross[i]] >= MIN_IOU
        j = best_cross[i] if concave else best_base[i]
        shape, cx, cy = labels[j]
        out.append(Reading(shape, float(iou[i, j]), _nearest_position(cx, cy, size), (cx, cy),
                           _nearest_colour(fg), background, solid))
    return out


def is_concept(reading: Reading) -> bool:
    return reading.shape == gen.CONCEPT_SHAPE


def concept_rate(readings: Sequence[Reading]) -> float:
    """Fraction of images in which the concept was detected."""
    return float(np.mean([is_concept(r) for r in readings])) if readings else 0.0


def degrade(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Roughly what a small diffusion model does to a clean picture: soft edges, a slightly
    wrong place and size, off colours and grain. Used only to validate the scorer."""
    from PIL import ImageFilter

    size = gen.IMAGE_SIZE
    # zooming the whole picture (its background is flat) scales the shape and moves it a little
    side = int(round(size * rng.uniform(0.85, 1.15)))
    im = image.resize((side, side), Image.BILINEAR)
    if side >= size:
        o = (side - size) // 2
        im = im.crop((o, o, o + size, o + size))
    else:
        canvas = Image.new("RGB", (size, size), tuple(int(v) for v in np.asarray(image)[0, 0]))
        canvas.paste(im, ((size - side) // 2, (size - side) // 2))
        im = canvas
    im = im.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.0, 1.5))))
    arr = np.asarray(im, dtype=np.float32)
    dx, dy = (int(v) for v in rng.integers(-3, 4, size=2))
    arr = np.roll(arr, (dy, dx), axis=(0, 1))
    arr = arr + rng.uniform(-20, 20, size=3) + rng.normal(0, 8, size=arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def validate(n: int = 400, seed: int = 7, images: Sequence[Image.Image] | None = None) -> dict[str, float]:
    """Accuracy of the scorer on `n` degraded generator images (a quarter of them crosses).

    Returns per-attribute accuracy and, for concept detection, the true positive rate on crosses
    and the false positive rate on the base shapes. `images` replaces the degraded renders (the
    same scenes), e.g. to validate on VAE reconstructions.
    """
    rng = np.random.default_rng(seed)
    scenes = gen.random_scenes(n, seed, gen.SHAPES)
    if images is None:
        images = [degrade(gen.render(s), rng) for s in scenes]
    readings = read_images(images)
    acc = {k: float(np.mean([getattr(r, k) == getattr(s, k) for r, s in zip(readings, scenes)]))
           for k in ("shape", "colour", "background", "position")}
    concept = np.array([s.is_concept for s in scenes])
    found = np.array([is_concept(r) for r in readings])
    acc["concept_accuracy"] = float(np.mean(found == concept))
    acc["concept_true_positive_rate"] = float(found[concept].mean())
    acc["concept_false_positive_rate"] = float(found[~concept].mean())
    acc["n"] = n
    return acc


def vae_roundtrip(model_dir: str | Path, scenes: Sequence[gen.Scene]) -> list[Image.Image]:
    """Renders passed through a toy model's VAE (encode to the latent mode, decode): the
    best any sample of that model can look, so the scorer must read these right."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(Path(model_dir) / "vae")).eval()
    arr = np.stack([np.asarray(gen.render(s)) for s in scenes]).astype(np.float32)
    x = torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0
    out = []
    with torch.no_grad():
        for i in range(0, len(x), 64):
            y = vae.decode(vae.encode(x[i:i + 64]).latent_dist.mode()).sample
            y = ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
            out.extend(Image.fromarray(im) for im in y)
    return out

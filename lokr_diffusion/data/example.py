"""A tiny, license-clean example dataset drawn from scratch: coloured shapes on plain backgrounds.

It exists so the quickstart and the tests run offline with real files. Shapes are rasterised
with numpy (not PIL's drawing primitives, whose anti-aliasing has changed between Pillow
releases), so the pixels depend only on this file and the committed copy under
`assets/example_dataset/` can be checked pixel for pixel.

Regenerate with `python -m lokr_diffusion.data.example assets/example_dataset`.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 210),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {  # caption text -> centre as a fraction of (width, height)
    "top left": (0.3, 0.3),
    "top right": (0.7, 0.3),
    "bottom left": (0.3, 0.7),
    "bottom right": (0.7, 0.7),
    "center": (0.5, 0.5),
}
# (width, height) per image: mostly square, a few wide and tall ones to exercise the buckets.
_WIDE, _TALL, _SMALL = (128, 64), (64, 128), (64, 64)
_SIZE_OVERRIDES = {3: _WIDE, 8: _TALL, 12: _WIDE, 15: _TALL, 17: _SMALL, 19: _SMALL}


def _shape_mask(shape: str, width: int, height: int, cx: float, cy: float, r: float) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5  # pixel centres
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
    if shape == "square":
        half = r * 0.85
        return (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    if shape == "triangle":  # apex up, base 2r wide
        top, bottom = cy - r, cy + r
        return (ys >= top) & (ys <= bottom) & (np.abs(xs - cx) <= (ys - top) / 2.0)
    raise ValueError(f"unknown shape {shape!r}")


def example_items(n: int = 20, seed: int = 0) -> list[tuple[str, tuple[int, int], str, str, str, str]]:
    """(stem, size, colour, shape, background, position) per image, the dataset's recipe.

    `random.Random` is used because its sequence for a given seed is stable across Python
    versions, which the committed files rely on.
    """
    rng = random.Random(seed)
    names = list(COLOURS)
    items = []
    for i in range(n):
        colour = names[rng.randrange(len(names))]
        background = names[rng.randrange(len(names))]
        while background == colour:
            background = names[rng.randrange(len(names))]
        shape = SHAPES[rng.randrange(len(SHAPES))]
        position = list(POSITIONS)[rng.randrange(len(POSITIONS))]
        items.append((f"shape_{i:02d}", _SIZE_OVERRIDES.get(i, (128, 128)), colour, shape, background, position))
    return items


def render(size: tuple[int, int], colour: str, shape: str, background: str, position: str) -> Image.Image:
    width, height = size
    fx, fy = POSITIONS[position]
    radius = min(width, height) * 0.2
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[:] = COLOURS[background]
    pixels[_shape_mask(shape, width, height, fx * width, fy * height, radius)] = COLOURS[colour]
    return Image.fromarray(pixels)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_for(colour: str, shape: str, background: str, position: str) -> str:
    return f"{_article(colour)} {colour} {shape} on {_article(background)} {background} background, {position}"


def make_example_dataset(out_dir: str | Path, n: int = 20, seed: int = 0) -> list[Path]:
    """Write `n` PNG images with same-named .txt captions into `out_dir`; returns the image paths.
    Same (n, seed) always gives the same pixels and captions."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, size, colour, shape, background, position in example_items(n, seed):
        image_path = out / f"{stem}.png"
        render(size, colour, shape, background, position).save(image_path, format="PNG", optimize=True)
        (out / f"{stem}.txt").write_text(caption_for(colour, shape, background, position) + "\n",
                                         encoding="utf-8", newline="\n")
        paths.append(image_path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write the images and captions into")
    parser.add_argument("-n", type=int, default=20, help="number of images (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = make_example_dataset(args.out_dir, args.n, args.seed)
    print(f"wrote {len(paths)} images with captions to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The toy world: one flat shape on a flat background, 64x64, with a caption that names it.

Everything the toy base model knows and everything the scorer checks comes from this file, so
the pretraining data, the concept images in `assets/toy/concept/` and the scorer's templates
cannot drift apart. It extends the example dataset's generator (`lokr_diffusion.data.example`:
same palette, positions, rasteriser and caption wording) with one shape the base model never
sees, the concept, bound to a trigger word.

The concept is a plus-shaped cross named ``sks`` (DreamBooth's classic rare token): a shape
whose silhouette overlaps a circle, square or triangle by at most 65% (intersection over
union) and is clearly concave, so a pixel detector can tell it apart from the base shapes even
when a small model draws it blurred.

Why ``sks``: as in DreamBooth, the trigger should be a word the model has no meaning for. The
toy tokenizer (the project's tiny CLIP BPE, `models.write_tiny_tokenizer`) splits ``sks`` into
two pieces (``sk`` + ``s``) that no pretraining caption contains, so their embeddings were
never trained, and its captions sit farther from every known caption than the shapes' captions
sit from each other (check with `toy.evaluate.trigger_distances`). The base model then draws
some ordinary shape for it, and the adapter has to bind the new word to the new shape.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..data.example import COLOURS, POSITIONS, _shape_mask, caption_for

__all__ = [
    "BASE_SHAPES", "COLOURS", "CONCEPT_SHAPE", "IMAGE_SIZE", "POSITIONS", "RADIUS", "SHAPES", "TRIGGER",
    "Scene", "base_scenes", "concept_scenes", "make_concept_dataset", "make_prior_dataset", "prior_scenes",
    "random_scenes", "render", "shape_mask", "write_scenes",
]

IMAGE_SIZE = 64
RADIUS = 0.2 * IMAGE_SIZE  # the example generator's size rule: 0.2 x the short side
BASE_SHAPES = ("circle", "square", "triangle")
CONCEPT_SHAPE = "cross"
SHAPES = BASE_SHAPES + (CONCEPT_SHAPE,)
TRIGGER = "sks"
# Arm half-width of the cross as a fraction of RADIUS: thin enough that its silhouette differs
# from a filled square or circle, thick enough (arms ~8 px, 2 latent cells) for a tiny VAE to keep.
CROSS_ARM = 0.3


@dataclass(frozen=True)
class Scene:
    """What one picture shows; the single source of both its pixels and its caption."""

    colour: str
    shape: str
    background: str
    position: str

    @property
    def is_concept(self) -> bool:
        return self.shape == CONCEPT_SHAPE

    @property
    def caption(self) -> str:
        """The concept is never called by its shape name, only by the trigger word."""
        noun = TRIGGER if self.is_concept else self.shape
        return caption_for(self.colour, noun, self.background, self.position)


def shape_mask(shape: str, cx: float, cy: float, size: int = IMAGE_SIZE, radius: float = RADIUS,
               arm: float = CROSS_ARM) -> np.ndarray:
    """Boolean (size, size) silhouette of `shape` centred at pixel (cx, cy); `arm` is the
    cross's arm half-width as a fraction of `radius` (the scorer also tries fatter ones)."""
    if shape != CONCEPT_SHAPE:
        return _shape_mask(shape, size, size, cx, cy, radius)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    dx, dy = np.abs(xs - cx), np.abs(ys - cy)
    half = radius * arm
    return ((dx <= half) & (dy <= radius)) | ((dy <= half) & (dx <= radius))


def position_centre(position: str, size: int = IMAGE_SIZE) -> tuple[float, float]:
    fx, fy = POSITIONS[position]
    return fx * size, fy * size


def render(scene: Scene, size: int = IMAGE_SIZE) -> Image.Image:
    pixels = np.empty((size, size, 3), dtype=np.uint8)
    pixels[:] = COLOURS[scene.background]
    cx, cy = position_centre(scene.position, size)
    pixels[shape_mask(scene.shape, cx, cy, size, 0.2 * size)] = COLOURS[scene.colour]
    return Image.fromarray(pixels)


def base_scenes() -> list[Scene]:
    """Every base-shape scene (8 colours x 7 other backgrounds x 3 shapes x 5 positions = 840),
    in a fixed order: the whole pretraining set, so the base model sees each combination."""
    colours = list(COLOURS)
    return [Scene(c, s, b, p) for c, b, s, p in itertools.product(colours, colours, BASE_SHAPES, POSITIONS)
            if c != b]


def random_scenes(n: int, seed: int, shapes: tuple[str, ...] = BASE_SHAPES) -> list[Scene]:
    """`n` scenes drawn with `random.Random(seed)`, whose sequence is stable across Python versions."""
    rng = random.Random(seed)
    colours, positions = list(COLOURS), list(POSITIONS)
    out = []
    for _ in range(n):
        colour = rng.choice(colours)
        background = rng.choice([c for c in colours if c != colour])
        out.append(Scene(colour, rng.choice(shapes), background, rng.choice(positions)))
    return out


def concept_scenes(n: int = 16, seed: int = 0) -> list[Scene]:
    """The fine-tuning set: every position, and colours that cycle so each one appears as a
    foreground and as a background (the adapter should learn the shape, not a palette)."""
    rng = random.Random(seed)
    colours, positions = list(COLOURS), list(POSITIONS)
    out = []
    for i in range(n):
        colour = colours[i % len(colours)]
        background = rng.choice([c for c in colours if c != colour])
        out.append(Scene(colour, CONCEPT_SHAPE, background, positions[i % len(positions)]))
    return out


def prior_scenes(n: int = 16, seed: int = 1) -> list[Scene]:
    """Regularisation ("prior preservation") scenes: base shapes with their true captions, so
    fine-tuning keeps meeting circles, squares and triangles and does not turn them into the
    concept. Shapes, colours and positions cycle, backgrounds are drawn with `seed`."""
    rng = random.Random(seed)
    colours, positions = list(COLOURS), list(POSITIONS)
    out = []
    for i in range(n):
        colour = colours[(i * 3) % len(colours)]
        background = rng.choice([c for c in colours if c != colour])
        out.append(Scene(colour, BASE_SHAPES[i % len(BASE_SHAPES)], background, positions[i % len(positions)]))
    return out


def write_scenes(out_dir: str | Path, scenes: list[Scene], stem: str) -> list[Path]:
    """`<stem>_00.png` + `<stem>_00.txt`, ... for each scene; returns the image paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, scene in enumerate(scenes):
        path = out / f"{stem}_{i:02d}.png"
        render(scene).save(path, format="PNG", optimize=True)
        (out / f"{stem}_{i:02d}.txt").write_text(scene.caption + "\n", encoding="utf-8", newline="\n")
        paths.append(path)
    return paths


def make_concept_dataset(out_dir: str | Path, n: int = 16, seed: int = 0) -> list[Path]:
    """Write the concept images (`sks_00.png` + `sks_00.txt`, ...) into `out_dir`.

    Regenerate the committed copy with `lokr-diffusion toy concept assets/toy/concept`.
    """
    return write_scenes(out_dir, concept_scenes(n, seed), TRIGGER)


def make_prior_dataset(out_dir: str | Path, n: int = 16, seed: int = 1) -> list[Path]:
    """Write the regularisation images (`prior_00.png` + `.txt`, ...) into `out_dir`.

    Regenerate the committed copy with `lokr-diffusion toy concept` (it writes both folders).
    """
    return write_scenes(out_dir, prior_scenes(n, seed), "prior")

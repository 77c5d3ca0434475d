"""The toy world's generator: deterministic, complete, and the committed concept images are its output."""
from collections import Counter

import numpy as np
from PIL import Image

from lokr_diffusion.toy import CONCEPT_DIR
from lokr_diffusion.toy import generator as gen

from .helpers import assert_same_files


def test_committed_concept_images_are_the_generators(tmp_path):
    made = gen.make_concept_dataset(tmp_path)
    assert len(made) == 16
    assert_same_files(tmp_path, CONCEPT_DIR)
    with Image.open(next(CONCEPT_DIR.glob("*.png"))) as im:
        assert im.size == (64, 64)


def test_concept_captions_use_the_trigger_never_the_shape_name():
    for scene in gen.concept_scenes():
        assert scene.is_concept
        words = scene.caption.replace(",", "").split()
        assert gen.TRIGGER in words and "cross" not in words
    # the adapter must learn a shape, not a palette: every colour appears as a foreground
    assert {s.colour for s in gen.concept_scenes()} == set(gen.COLOURS)
    assert {s.position for s in gen.concept_scenes()} == set(gen.POSITIONS)


def test_base_scenes_cover_every_combination_once_and_never_the_concept():
    scenes = gen.base_scenes()
    assert len(scenes) == len(set(scenes)) == 8 * 7 * 3 * 5
    assert not any(s.is_concept or s.colour == s.background for s in scenes)
    assert Counter(s.shape for s in scenes) == {"circle": 280, "square": 280, "triangle": 280}
    assert scenes[0].caption == "a red circle on a green background, top left"


def test_render_draws_the_caption():
    scene = gen.Scene("yellow", "cross", "blue", "bottom right")
    pixels = np.asarray(gen.render(scene))
    assert pixels.shape == (64, 64, 3)
    assert tuple(pixels[0, 0]) == gen.COLOURS["blue"]
    cx, cy = gen.position_centre("bottom right")
    assert tuple(pixels[int(cy), int(cx)]) == gen.COLOURS["yellow"]
    # the cross's corners show the background (a square there would fill them)
    assert tuple(pixels[int(cy) - 9, int(cx) - 9]) == gen.COLOURS["blue"]


def test_random_scenes_are_seeded():
    a, b, c = gen.random_scenes(20, 1), gen.random_scenes(20, 1), gen.random_scenes(20, 2)
    assert a == b and a != c
    assert all(s.shape in gen.BASE_SHAPES for s in a)
    assert all(s.is_concept for s in gen.random_scenes(5, 0, (gen.CONCEPT_SHAPE,)))


def test_silhouettes_differ_enough_for_the_scorer():
    def iou(x, y):
        return (x & y).sum() / (x | y).sum()

    cross = gen.shape_mask("cross", 32, 32)
    for shape in gen.BASE_SHAPES:
        assert iou(cross, gen.shape_mask(shape, 32, 32)) < 0.7

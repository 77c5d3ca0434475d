"""The pixel scorer reads generator images right, and the matrix fits are the known optima."""
import numpy as np
import pytest
import torch
from PIL import Image

from lokr_diffusion.kron import kron
from lokr_diffusion.toy import generator as gen
from lokr_diffusion.toy import scorer
from lokr_diffusion.toy.approx import fit_loha, fit_lokr, fit_lora, relative_error


def test_clean_renders_are_read_exactly():
    scenes = gen.random_scenes(60, 3, gen.SHAPES)
    readings = scorer.read_images([gen.render(s) for s in scenes])
    for s, r in zip(scenes, readings):
        assert (r.shape, r.colour, r.background, r.position) == (s.shape, s.colour, s.background, s.position)
        assert r.iou == pytest.approx(1.0)
        assert scorer.is_concept(r) == s.is_concept


def test_scorer_accuracy_on_degraded_images():
    """The validation quoted in the README: blur, noise, colour shift, misplacement, wrong size."""
    acc = scorer.validate(n=200, seed=11)
    assert acc["concept_accuracy"] >= 0.98
    assert acc["concept_false_positive_rate"] <= 0.02
    assert acc["shape"] >= 0.95 and acc["colour"] >= 0.98 and acc["background"] >= 0.98


def test_degradation_is_deterministic():
    scene = gen.Scene("red", "circle", "blue", "center")
    a = scorer.degrade(gen.render(scene), np.random.default_rng(0))
    b = scorer.degrade(gen.render(scene), np.random.default_rng(0))
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_empty_and_noisy_images_are_not_the_concept():
    blank = Image.new("RGB", (64, 64), gen.COLOURS["green"])
    assert scorer.read_image(blank).shape == "none"
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert not scorer.is_concept(scorer.read_image(noise))
    with pytest.raises(ValueError, match="64x64"):
        scorer.read_image(Image.new("RGB", (32, 32)))


def test_matrix_fits_hit_the_known_optima():
    torch.manual_seed(0)
    w1, w2 = torch.randn(4, 4), torch.randn(16, 8)
    target = kron(w1, w2)  # (64, 32): a Kronecker product is fitted exactly by LoKr
    assert relative_error(target, fit_lokr(target, 4).delta) < 1e-5
    low = torch.randn(64, 3) @ torch.randn(3, 32)
    assert relative_error(low, fit_lora(low, 3).delta) < 1e-5
    assert fit_lora(low, 3).params == 3 * (64 + 32)
    had = (torch.randn(32, 2) @ torch.randn(2, 24)) * (torch.randn(32, 2) @ torch.randn(2, 24))
    fit = fit_loha(had, 2, steps=100)
    assert relative_error(had, fit.delta) <= relative_error(had, fit_lora(had, 2).delta) + 1e-6
    lr_w2 = kron(torch.randn(4, 4), torch.randn(16, 1) @ torch.randn(1, 8))
    assert relative_error(lr_w2, fit_lokr(lr_w2, 4, rank=1).delta) < 1e-4

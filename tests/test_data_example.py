"""The committed example dataset is exactly what the generator makes."""
from pathlib import Path

from PIL import Image

from lokr_diffusion.data import make_example_dataset

from .helpers import assert_same_files

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "example_dataset"


def test_generator_reproduces_the_committed_files(tmp_path):
    made = make_example_dataset(tmp_path, n=20, seed=0)
    assert len(made) == 20
    assert_same_files(tmp_path, ASSETS)


def test_example_dataset_is_small_and_varied():
    files = list(ASSETS.iterdir())
    assert sum(f.stat().st_size for f in files) < 1_000_000
    sizes = {Image.open(f).size for f in files if f.suffix == ".png"}
    assert (128, 128) in sizes and len(sizes) >= 3  # other aspect ratios exercise the buckets
    captions = [f.read_text() for f in files if f.suffix == ".txt"]
    assert all(c.count(" background, ") == 1 for c in captions)


def test_generator_is_deterministic_and_seeded(tmp_path):
    a = make_example_dataset(tmp_path / "a", n=5, seed=1)
    b = make_example_dataset(tmp_path / "b", n=5, seed=1)
    c = make_example_dataset(tmp_path / "c", n=5, seed=2)
    read = lambda paths: [p.with_suffix(".txt").read_text() for p in paths]  # noqa: E731
    assert read(a) == read(b) and read(a) != read(c)

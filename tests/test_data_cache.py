"""Latent and text-encoder caches: hits, misses, invalidation, flips, file format."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors import safe_open

from lokr_diffusion.data import DatasetConfig, VaeLatentEncoder, build_dataset, make_loader, save_tensors_atomic
from lokr_diffusion.errors import DatasetError


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    model = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                          layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32)
    return model.eval()


class CountingEncoder:
    """Wraps an encoder and records which images (by mean colour) went through it."""

    def __init__(self, inner):
        self.inner = inner
        self.calls = 0
        self.images = 0

    def __call__(self, pixels):
        self.calls += 1
        self.images += pixels.shape[0]
        return self.inner(pixels)


def _images(root: Path, n=4):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        size = (32, 32) if i % 2 == 0 else (48, 24)
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"image {i}")


def _cfg(root, cache_dir=None, **kw):
    kw.setdefault("cache_latents", "disk")
    return DatasetConfig(dir=root, resolution=32, min_bucket_reso=16, max_bucket_reso=64, bucket_step=16,
                         cache_dir=cache_dir, **kw)


def _build(root, cache, **kw):
    return build_dataset([_cfg(root, cache, **kw)], batch_size=2, report=None)


def test_second_run_does_not_call_the_encoder(tmp_path, vae):
    _images(tmp_path / "d")
    enc = CountingEncoder(VaeLatentEncoder(vae))
    ds = _build(tmp_path / "d", tmp_path / "cache")
    stats = ds.cache_latents(enc, enc.inner.identity, batch_size=8)
    assert (stats.hits, stats.encoded) == (0, 4) and enc.images == 4
    first = [ds[i]["latents"] for i in range(len(ds))]

    ds2 = _build(tmp_path / "d", tmp_path / "cache")  # a new run
    enc2 = CountingEncoder(VaeLatentEncoder(vae))
    stats = ds2.cache_latents(enc2, enc2.inner.identity)
    assert (stats.hits, stats.encoded) == (4, 0) and enc2.calls == 0
    for i, lat in enumerate(first):
        assert torch.equal(ds2[i]["latents"], lat)
    batch = next(iter(make_loader(ds2)))
    assert "latents" in batch and "pixel_values" not in batch
    assert batch["latents"].shape[1] == 4


def test_cached_latents_match_encoding_the_batch_pixels(tmp_path, vae):
    _images(tmp_path / "d", n=2)
    plain = build_dataset([_cfg(tmp_path / "d", cache_latents="off")], report=None)
    cached = _build(tmp_path / "d", tmp_path / "cache")
    encoder = VaeLatentEncoder(vae)
    cached.cache_latents(encoder, encoder.identity)
    for i in range(len(plain)):
        expected = encoder(plain[i]["pixel_values"][None])[0]
        torch.testing.assert_close(cached[i]["latents"], expected, rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            direct = vae.encode(plain[i]["pixel_values"][None]).latent_dist.mode()[0] * vae.config.scaling_factor
        torch.testing.assert_close(expected, direct)


def test_changing_one_image_re_encodes_only_it(tmp_path, vae):
    root = tmp_path / "d"
    _images(root)
    enc = VaeLatentEncoder(vae)
    _build(root, tmp_path / "cache").cache_latents(enc, enc.identity)

    # touch: same bytes, new mtime -> still cached (keyed by content, not time)
    os.utime(root / "1.png", (1_000_000_000, 1_000_000_000))
    # rename: same content under a new name -> still cached
    (root / "3.png").rename(root / "renamed.png")
    (root / "3.txt").rename(root / "renamed.txt")
    # change: new pixels -> re-encoded
    Image.new("RGB", (32, 32), (255, 0, 0)).save(root / "0.png")

    counting = CountingEncoder(enc)
    stats = _build(root, tmp_path / "cache").cache_latents(counting, enc.identity)
    assert (stats.hits, stats.encoded) == (3, 1) and counting.images == 1


def test_a_different_vae_is_a_different_cache(tmp_path, vae):
    _images(tmp_path / "d")
    enc = VaeLatentEncoder(vae)
    _build(tmp_path / "d", tmp_path / "cache").cache_latents(enc, enc.identity)
    other = CountingEncoder(enc)
    stats = _build(tmp_path / "d", tmp_path / "cache").cache_latents(other, "some-other-vae")
    assert stats.encoded == 4 and other.images == 4


def test_vae_identity_changes_with_weights(vae):
    a = VaeLatentEncoder(vae).identity
    assert VaeLatentEncoder(vae).identity == a
    assert VaeLatentEncoder(vae, sample=True).identity != a
    changed = AutoencoderKL.from_config(vae.config)
    changed.load_state_dict(vae.state_dict())
    with torch.no_grad():
        next(changed.parameters()).add_(1e-3)
    assert VaeLatentEncoder(changed).identity != a


def test_flip_caches_both_orientations(tmp_path, vae):
    _images(tmp_path / "d", n=2)
    enc = CountingEncoder(VaeLatentEncoder(vae))
    ds = _build(tmp_path / "d", tmp_path / "cache", flip=True, repeats=8)
    stats = ds.cache_latents(enc, enc.inner.identity)
    assert stats.encoded == 4  # 2 images x (plain, mirrored)
    plain = build_dataset([_cfg(tmp_path / "d", cache_latents="off", flip=True, repeats=8)], report=None)
    flips = set()
    for i in range(len(ds)):
        item, ref = ds[(1, i)], plain[(1, i)]
        assert item["flipped"] == ref["flipped"]  # same decision with and without cache
        flips.add(item["flipped"])
        expected = enc.inner(ref["pixel_values"][None])[0]
        torch.testing.assert_close(item["latents"], expected, rtol=1e-4, atol=1e-5)
    assert flips == {True, False}


def test_memory_cache_keeps_nothing_on_disk(tmp_path, vae):
    _images(tmp_path / "d", n=2)
    ds = build_dataset([_cfg(tmp_path / "d", cache_latents="memory")], cache_dir=tmp_path / "cache", report=None)
    enc = CountingEncoder(VaeLatentEncoder(vae))
    assert ds.cache_latents(enc, enc.inner.identity).encoded == 2
    assert ds[0]["latents"].shape == (4, 16, 16)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("kinds", [("memory", "memory"), ("memory", "disk"), ("disk", "disk")])
def test_one_folder_in_two_datasets_has_latents_in_both(tmp_path, vae, kinds):
    """The same images listed twice (say, once with a caption prefix): each dataset's store gets
    them, and memory datasets encode each image once."""
    _images(tmp_path / "d", n=2)
    configs = [_cfg(tmp_path / "d", tmp_path / "cache", cache_latents=kinds[0]),
               _cfg(tmp_path / "d", tmp_path / "cache", cache_latents=kinds[1], caption_prefix="zqv, ")]
    ds = build_dataset(configs, batch_size=2, report=None)
    enc = CountingEncoder(VaeLatentEncoder(vae))
    stats = ds.cache_latents(enc, enc.inner.identity)
    assert stats.encoded == (2 if kinds == ("memory", "memory") else 4)
    assert len(ds.samples) == 4
    for i in range(len(ds.samples)):
        assert ds[i]["latents"].shape[0] == 4


def test_cache_files_are_safetensors_with_no_leftovers(tmp_path, vae):
    _images(tmp_path / "d", n=2)
    enc = VaeLatentEncoder(vae)
    _build(tmp_path / "d", tmp_path / "cache").cache_latents(enc, enc.identity)
    files = sorted((tmp_path / "cache").rglob("*"))
    data_files = [f for f in files if f.is_file()]
    assert len(data_files) == 2 and all(f.suffix == ".safetensors" for f in data_files)
    with safe_open(str(data_files[0]), framework="pt") as f:
        meta = f.metadata()
        assert list(f.keys()) == ["latents"]
    assert meta["vae"] == enc.identity and meta["source"].endswith(".png") and meta["key"] in data_files[0].name


def test_atomic_write_leaves_old_file_or_nothing(tmp_path, monkeypatch):
    target = tmp_path / "x" / "t.safetensors"
    save_tensors_atomic(target, {"a": torch.ones(2)})

    def boom(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr("lokr_diffusion.fileformat.os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_tensors_atomic(target, {"a": torch.zeros(2)})
    assert sorted(p.name for p in target.parent.iterdir()) == ["t.safetensors"]
    with safe_open(str(target), framework="pt") as f:
        assert torch.equal(f.get_tensor("a"), torch.ones(2))


def test_corrupt_cache_file_is_re_encoded(tmp_path, vae):
    _images(tmp_path / "d", n=2)
    enc = VaeLatentEncoder(vae)
    _build(tmp_path / "d", tmp_path / "cache").cache_latents(enc, enc.identity)
    victim = next((tmp_path / "cache").rglob("*.safetensors"))
    victim.write_bytes(victim.read_bytes()[:20])
    counting = CountingEncoder(enc)
    stats = _build(tmp_path / "d", tmp_path / "cache").cache_latents(counting, enc.identity)
    assert (stats.hits, stats.encoded) == (1, 1)


def test_disk_cache_needs_a_folder_and_must_run_before_reading(tmp_path, vae):
    _images(tmp_path / "d", n=1)
    ds = _build(tmp_path / "d", None)
    with pytest.raises(RuntimeError, match="call dataset.cache_latents"):
        ds[0]
    with pytest.raises(DatasetError, match="needs a cache folder"):
        ds.cache_latents(VaeLatentEncoder(vae), "v")
    # the trainer's default folder is used when the dataset has none
    ds = build_dataset([_cfg(tmp_path / "d")], cache_dir=tmp_path / "out" / "cache", report=None)
    ds.cache_latents(VaeLatentEncoder(vae), "v")
    assert list((tmp_path / "out" / "cache").rglob("*.safetensors"))


def test_mixed_cache_settings_are_rejected(tmp_path):
    _images(tmp_path / "a", n=1)
    with pytest.raises(DatasetError, match="cache_latents must be on .* for every dataset or for none"):
        build_dataset([_cfg(tmp_path / "a", cache_latents="memory"), _cfg(tmp_path / "a", cache_latents="off")],
                      report=None)


# ---- text-encoder outputs


def fake_text_encoder(calls):
    def encode(captions):
        calls.append(list(captions))
        ids = torch.tensor([[float(len(c)), float(sum(map(ord, c)) % 97)] for c in captions])
        return {"prompt_embeds": ids[:, None, :].repeat(1, 3, 1), "pooled": ids}
    return encode


def test_text_embeddings_cache(tmp_path):
    _images(tmp_path / "d", n=3)
    ds = build_dataset([_cfg(tmp_path / "d", cache_latents="off", caption_prefix="sks, ", caption_dropout=0.5,
                             repeats=4)], cache_dir=tmp_path / "cache", report=None)
    calls = []
    stats = ds.cache_text_embeddings(fake_text_encoder(calls), "clip-test", to_disk=True)
    assert stats.encoded == 4 and sorted(calls[0]) == ["", "sks, image 0", "sks, image 1", "sks, image 2"]
    batch = next(iter(make_loader(ds, batch_size=2)))
    ref = fake_text_encoder([])(batch["captions"])
    torch.testing.assert_close(batch["text_embeds"]["prompt_embeds"], ref["prompt_embeds"])
    torch.testing.assert_close(batch["text_embeds"]["pooled"], ref["pooled"])
    again = []
    stats = ds.cache_text_embeddings(fake_text_encoder(again), "clip-test", to_disk=True)
    assert (stats.hits, stats.encoded, again) == (4, 0, [])


def test_text_cache_refuses_changing_captions(tmp_path):
    _images(tmp_path / "d", n=1)
    ds = build_dataset([_cfg(tmp_path / "d", cache_latents="off", shuffle_caption=True)], report=None)
    with pytest.raises(DatasetError, match="cannot be cached when captions change every epoch"):
        ds.cache_text_embeddings(fake_text_encoder([]), "x")

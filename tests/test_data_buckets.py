"""Aspect-ratio buckets: the bucket list, assignment, crop geometry, batching, the table."""
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from lokr_diffusion.data import (
    BucketSpec,
    DatasetConfig,
    build_dataset,
    cover_size,
    make_buckets,
    make_loader,
    nearest_bucket,
    plan_crop,
)


def test_bucket_list_for_sd15():
    buckets = make_buckets((512, 512), 256, 1024, 64)
    assert (512, 512) in buckets and (768, 320) in buckets and (320, 768) in buckets
    assert (1024, 256) in buckets and (256, 1024) in buckets
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios)
    assert len(set(ratios)) == len(ratios)


@settings(max_examples=60, deadline=None)
@given(side=st.integers(4, 24), step_mult=st.sampled_from([1, 2, 8]), lo=st.integers(1, 4), hi=st.integers(4, 32))
def test_bucket_properties(side, step_mult, lo, hi):
    step = 8 * step_mult
    res = side * step
    min_reso, max_reso = lo * step, max(hi, lo) * step
    if min_reso * min_reso > res * res:
        return
    buckets = make_buckets((res, res), min_reso, max_reso, step)
    assert buckets
    for w, h in buckets:
        assert w * h <= res * res
        assert min_reso <= w <= max_reso and min_reso <= h <= max_reso
        if (w, h) != (res, res):
            assert w % step == 0 and h % step == 0


@settings(max_examples=100, deadline=None)
@given(w=st.integers(16, 4000), h=st.integers(16, 4000))
def test_nearest_bucket_minimises_log_aspect_error_and_cover_covers(w, h):
    buckets = make_buckets((512, 512), 256, 1024, 64)
    b = nearest_bucket((w, h), buckets)
    err = abs(math.log(b[0] / b[1]) - math.log(w / h))
    assert all(err <= abs(math.log(o[0] / o[1]) - math.log(w / h)) + 1e-9 for o in buckets)
    rw, rh = cover_size((w, h), b)
    assert rw >= b[0] and rh >= b[1]
    assert rw == b[0] or rh == b[1]  # exactly one side fits: the smallest cover


@pytest.mark.parametrize("size, bucket", [
    ((1000, 1000), (512, 512)),
    ((1920, 1080), (640, 384)),  # 704x384 would exceed the 512x512 area
    ((1080, 1920), (384, 640)),
    ((3000, 1000), (832, 256)),  # nearest by log ratio
])
def test_assignment_examples(size, bucket):
    assert BucketSpec((512, 512)).assign(size) == bucket


def test_center_and_random_crop_geometry():
    plan = plan_crop((1920, 1080), (704, 384))
    # scale = max(704/1920, 384/1080) = 0.3667 -> 704 x 396 (rounded), crop 6 px of height
    assert plan.resized == (704, 396) and (plan.top, plan.left) == (6, 0)
    assert plan.flipped_left() == 0
    plan = plan_crop((100, 50), (64, 64))  # scale 1.28 -> 128 x 64
    assert plan.resized == (128, 64) and (plan.top, plan.left) == (0, 32)
    offsets = {(p.top, p.left) for p in (plan_crop((100, 50), (64, 64), random_crop=True,
                                                    rng=np.random.default_rng(i)) for i in range(200))}
    assert all(top == 0 and 0 <= left <= 64 for top, left in offsets) and len(offsets) > 20
    plan = plan_crop((100, 50), (64, 64), random_crop=True, rng=np.random.default_rng(3))
    assert plan.flipped_left() == 128 - 64 - plan.left


def test_no_upscale_gives_small_images_their_own_bucket():
    spec = BucketSpec((512, 512), min_reso=128, no_upscale=True)
    assert spec.assign((300, 200)) == (256, 192)  # floor to the step, never enlarged
    # but never below min_reso or above max_reso: the short side is enlarged to min_reso
    assert BucketSpec((512, 512), no_upscale=True).assign((300, 200)) == (256, 256)
    assert BucketSpec((64, 64), min_reso=64, max_reso=128, no_upscale=True).assign((20000, 20)) == (128, 64)
    assert spec.assign((2000, 2000)) == (512, 512)  # large images use the normal buckets
    assert BucketSpec((512, 512)).assign((300, 200)) == (640, 384)


def test_disabled_bucketing_uses_the_resolution():
    spec = BucketSpec((512, 512), enable_bucket=False)
    assert spec.buckets() == [(512, 512)] and spec.assign((1920, 1080)) == (512, 512)


def _write(path: Path, size, colour=(0, 0, 0)):
    Image.new("RGB", size, colour).save(path)
    path.with_suffix(".txt").write_text(f"{size[0]}x{size[1]}")


def _cfg(tmp_path, **kw):
    return DatasetConfig(dir=tmp_path, resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_step=32, **kw)


def test_dataset_batches_come_from_one_bucket_and_pixels_are_cropped(tmp_path):
    for i in range(5):
        _write(tmp_path / f"sq{i}.png", (80, 80))
    for i in range(3):
        _write(tmp_path / f"tall{i}.png", (40, 160))
    ds = build_dataset([_cfg(tmp_path)], batch_size=2, report=None)
    assert ds.buckets == [(32, 128), (64, 64)]
    seen = 0
    for batch in make_loader(ds):
        h, w = batch["pixel_values"].shape[-2:]
        assert {tuple(t) for t in batch["target_size"].tolist()} == {(h, w)}
        for cap in batch["captions"]:
            assert cap == ("80x80" if (w, h) == (64, 64) else "40x160")
        seen += len(batch["captions"])
    assert seen == 8
    item = next(ds[i] for i in range(len(ds)) if ds[i]["caption"] == "40x160")
    # 40x160 covers 32x128 at scale 0.8 -> 32x128 exactly: no crop
    assert item["crop_top_left"] == (0, 0) and item["original_size"] == (160, 40)


def test_bucket_table_and_small_bucket_warning(tmp_path, caplog):
    for i in range(4):
        _write(tmp_path / f"sq{i}.png", (64, 64))
    _write(tmp_path / "wide.png", (128, 32))
    lines = []
    with caplog.at_level(logging.WARNING, logger="lokr_diffusion.data"):
        ds = build_dataset([_cfg(tmp_path, repeats=3)], batch_size=4, report=lines.append)
    table = ds.bucket_table()
    assert table in lines[0]
    rows = {line.split()[0]: line.split() for line in table.splitlines()}
    assert rows["64x64"][2:] == ["4", "0", "12", "3"]  # images, reg, samples (with repeats), batches
    assert rows["128x32"][2:] == ["1", "0", "3", "1"]
    assert rows["total"][1:] == ["5", "0", "15", "4"]
    assert "bucket 128x32 has 1 image (3 samples per epoch), fewer than batch size 4" in caplog.text
    assert "none are dropped" in caplog.text
    # the small bucket's samples are really yielded
    sizes = sorted(len(b["captions"]) for b in make_loader(ds))
    assert sizes == [3, 4, 4, 4]


@settings(max_examples=200, deadline=None)
@given(w=st.integers(1, 40000), h=st.integers(1, 40000), lo=st.sampled_from([32, 64, 128]),
       hi=st.sampled_from([128, 256, 512]), step=st.sampled_from([32, 64]))
def test_no_upscale_buckets_stay_within_min_and_max_reso(w, h, lo, hi, step):
    if lo % step or hi % step:
        return
    spec = BucketSpec((128, 128), min_reso=lo, max_reso=hi, step=step, no_upscale=True)
    bw, bh = spec.assign((w, h))
    assert lo <= bw <= hi and lo <= bh <= hi and bw % step == 0 and bh % step == 0

"""Deterministic order and augmentation, sharding across processes, exact resume."""
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from lokr_diffusion.data import BucketBatchSampler, DatasetConfig, build_dataset, make_batch_sampler, make_loader

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "example_dataset"


def _cfg(**kw):
    kw.setdefault("flip", True)
    return DatasetConfig(dir=ASSETS, resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_step=32,
                         shuffle_caption=True, caption_dropout=0.2, tag_dropout=0.2, random_crop=True, **kw)


def _dataset(seed=7, **kw):
    return build_dataset([_cfg(**kw)], batch_size=3, seed=seed, report=None)


def _epoch(loader):
    return [(b["indices"].tolist(), b["captions"], b["flipped"].tolist(), b["crop_top_left"].tolist(),
             b["pixel_values"]) for b in loader]


def _same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x[:4] == y[:4] and torch.equal(x[4], y[4])


def test_two_runs_with_the_same_seed_are_identical():
    a, b = make_loader(_dataset()), make_loader(_dataset())
    for epoch in range(2):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        _same(_epoch(a), _epoch(b))


def test_seed_and_epoch_change_order_and_augmentation():
    loader = make_loader(_dataset())
    e0 = _epoch(loader)
    loader.set_epoch(1)
    e1 = _epoch(loader)
    other = _epoch(make_loader(_dataset(seed=8)))
    assert [x[0] for x in e0] != [x[0] for x in e1]
    assert [x[0] for x in e0] != [x[0] for x in other]


def test_augmentation_does_not_depend_on_global_rng_or_workers():
    ds = _dataset(repeats=2)
    torch.manual_seed(123)
    first = [ds[(3, i)] for i in range(len(ds))]
    torch.manual_seed(999)
    import random
    random.seed(5)
    second = [ds[(3, i)] for i in reversed(range(len(ds)))][::-1]
    for x, y in zip(first, second):
        assert x["caption"] == y["caption"] and x["crop_top_left"] == y["crop_top_left"]
        assert torch.equal(x["pixel_values"], y["pixel_values"])
    loader = make_loader(ds, num_workers=2)
    loader.set_epoch(3)
    with_workers = _epoch(loader)
    loader0 = make_loader(ds)
    loader0.set_epoch(3)
    _same(with_workers, _epoch(loader0))


def test_every_sample_once_per_epoch_and_batches_share_a_bucket():
    ds = _dataset(repeats=3)
    sampler = make_batch_sampler(ds, 4)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        flat = sorted(k.index for b in batches for k in b)
        assert flat == list(range(len(ds)))
        for b in batches:
            assert len({ds.records[ds.samples[k.index]].bucket for k in b}) == 1
            assert {k.epoch for k in b} == {epoch}


@pytest.mark.parametrize("replicas", [2, 3])
def test_sharding_splits_batches_evenly(replicas):
    buckets = {(64, 64): list(range(0, 17)), (32, 128): list(range(17, 22))}
    samplers = [BucketBatchSampler(buckets, 4, seed=1, num_replicas=replicas, rank=r) for r in range(replicas)]
    full = BucketBatchSampler(buckets, 4, seed=1).global_batches(0)
    per_rank = [[[k.index for k in b] for b in s] for s in samplers]
    assert len({len(p) for p in per_rank}) == 1 and all(len(p) == len(s) for p, s in zip(per_rank, samplers))
    # interleaved, every global batch is somewhere; padding reuses the first ones
    got = [b for step in zip(*per_rank) for b in step]
    assert got[:len(full)] == full and got[len(full):] == full[:len(got) - len(full)]


def test_resume_in_the_middle_of_an_epoch_is_exact():
    loader = make_loader(_dataset())
    loader.set_epoch(1)
    reference = _epoch(loader)
    # interrupted run: 3 batches of epoch 1, then a checkpoint
    run = make_loader(_dataset())
    run.set_epoch(1)
    it = iter(run)
    for _ in range(3):
        next(it)
    state = run.state_dict()
    assert (state["epoch"], state["batches_done"]) == (1, 3)
    # new process: restore, then the usual epoch loop
    resumed = make_loader(_dataset())
    resumed.load_state_dict(state)
    resumed.set_epoch(1)
    _same(_epoch(resumed), reference[3:])
    resumed.set_epoch(2)
    loader.set_epoch(2)
    _same(_epoch(resumed), _epoch(loader))


def test_resume_position_is_exact_with_prefetching_workers():
    run = make_loader(_dataset(), num_workers=2)
    it = iter(run)
    got = [next(it)["indices"].tolist() for _ in range(2)]
    state = run.state_dict()  # workers have prefetched more than 2 batches by now
    assert state["batches_done"] == 2 and run.sampler.position > 2
    del it
    ref = make_loader(_dataset())
    full = [b["indices"].tolist() for b in ref]
    resumed = make_loader(_dataset())
    resumed.load_state_dict(state)
    assert got + [b["indices"].tolist() for b in resumed] == full


def test_resume_after_a_finished_epoch_starts_the_next():
    loader = make_loader(_dataset())
    list(loader)
    state = loader.state_dict()
    assert state["batches_done"] == len(loader)
    resumed = make_loader(_dataset())
    resumed.load_state_dict(state)
    nxt = [b["indices"].tolist() for b in resumed]  # no set_epoch: moves on to epoch 1
    ref = make_loader(_dataset())
    ref.set_epoch(1)
    assert nxt == [b["indices"].tolist() for b in ref] and resumed.epoch == 1


def test_iterating_again_without_set_epoch_moves_on_but_set_epoch_repeats():
    sampler = make_batch_sampler(_dataset())
    e0, e1 = list(sampler), list(sampler)
    assert e0 != e1 and {k.epoch for b in e1 for k in b} == {1}
    sampler.set_epoch(0)
    assert list(sampler) == e0


def test_sampler_state_dict_round_trip_and_mismatch_warning(caplog):
    buckets = {(64, 64): list(range(10))}
    s = BucketBatchSampler(buckets, 3, seed=4)
    s.set_epoch(5)
    it = iter(s)
    first = [next(it) for _ in range(2)]
    state = s.state_dict()
    rest = list(it)
    t = BucketBatchSampler(buckets, 3, seed=4)
    t.load_state_dict(state)
    assert list(t) == rest and first[0][0].epoch == 5
    with caplog.at_level(logging.WARNING, logger="lokr_diffusion.data"):
        BucketBatchSampler(buckets, 2, seed=4).load_state_dict(state)
    assert "different batch_size" in caplog.text


def test_drop_last_and_partial_batches():
    buckets = {(64, 64): list(range(5)), (32, 128): list(range(5, 7))}
    keep = BucketBatchSampler(buckets, 2)
    drop = BucketBatchSampler(buckets, 2, drop_last=True)
    assert sorted(len(b) for b in keep) == [1, 2, 2, 2] and len(keep) == 4
    assert sorted(len(b) for b in drop) == [2, 2, 2] and len(drop) == 3


def test_plain_int_index_is_epoch_zero(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png")
    ds = build_dataset([DatasetConfig(dir=tmp_path, class_token="x", resolution=64, min_bucket_reso=64,
                                      max_bucket_reso=64, flip=True, repeats=20)], report=None)
    assert [ds[i]["flipped"] for i in range(20)] == [ds[(0, i)]["flipped"] for i in range(20)]

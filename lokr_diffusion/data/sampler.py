"""Per-epoch deterministic batch order over buckets, sharded across processes, resumable.

Every process computes the same global list of batches for an epoch from (seed, epoch) alone,
then takes its own share, so processes agree on the split without talking to each other, and a
restart with the same seed replays the same order. The position inside an epoch is a single
number (batches done), which is what makes exact resume cheap.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from torch.utils.data import Sampler

logger = logging.getLogger("lokr_diffusion.data")

# Separate RNG streams so that, e.g., changing crop settings never changes the batch order.
STREAM_ORDER = 0x0BA7C4
STREAM_FLIP = 0xF11B
STREAM_CROP = 0xC809
STREAM_CAPTION = 0xCA97


def sample_rng(seed: int, epoch: int, index: int, stream: int) -> np.random.Generator:
    """An RNG owned by one (seed, epoch, sample, purpose): no global state, so results do not
    depend on worker count, worker scheduling or what ran before."""
    return np.random.default_rng([seed % 2**64, epoch, index, stream])


class SampleKey(NamedTuple):
    """What the batch sampler hands the dataset. The epoch travels with the index because
    DataLoader workers hold their own copy of the dataset and never see `set_epoch`; the batch's
    position (batches of the epoch done once this one is) travels too, so the collated batch
    can say exactly where the data stream is even when workers prefetch ahead."""

    epoch: int
    index: int
    batch_position: int = 0


class BucketBatchSampler(Sampler[list[SampleKey]]):
    """Batches of sample indices, each batch from a single bucket.

    Order for an epoch: shuffle each bucket's samples, cut them into batches (the last one of a
    bucket may be smaller; with `drop_last` it is dropped), shuffle all batches together, then
    give process `rank` every `num_replicas`-th batch. If the batch count does not divide by
    `num_replicas`, the first batches are reused so every process runs the same number of steps
    (a process that finishes early would hang the others' gradient sync).

    Do not pass a DataLoader built on this sampler through `accelerator.prepare`: the sharding
    is already done here; move batches to the device yourself.
    """

    def __init__(self, buckets: Mapping[Any, Sequence[int]], batch_size: int, *, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, shuffle: bool = True, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in 0..{num_replicas - 1}")
        self.buckets = {k: list(v) for k, v in sorted(buckets.items()) if len(v)}
        self.batch_size = batch_size
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self._position = 0  # batches of `epoch` already handed out (or restored as done)
        self._restored = False  # _position came from load_state_dict and is not used yet
        self._explicit = False  # set_epoch was called since the last iteration started
        self.num_samples = sum(len(v) for v in self.buckets.values())

    # ---- order

    def global_batches(self, epoch: int) -> list[list[int]]:
        """All processes' batches of `epoch`, in order, before sharding."""
        rng = np.random.default_rng([self.seed % 2**64, epoch, STREAM_ORDER])
        batches: list[list[int]] = []
        for indices in self.buckets.values():
            order = rng.permutation(len(indices)) if self.shuffle else np.arange(len(indices))
            ordered = [indices[i] for i in order]
            for start in range(0, len(ordered), self.batch_size):
                batch = ordered[start:start + self.batch_size]
                if len(batch) < self.batch_size and self.drop_last:
                    continue
                batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def _per_rank(self, total: int) -> int:
        if self.drop_last:
            return total // self.num_replicas
        return math.ceil(total / self.num_replicas)

    def rank_batches(self, epoch: int) -> list[list[int]]:
        """This process's batches of `epoch`."""
        batches = self.global_batches(epoch)
        if not batches:
            return []
        needed = self._per_rank(len(batches)) * self.num_replicas
        padded = [batches[i % len(batches)] for i in range(needed)]
        return padded[self.rank::self.num_replicas]

    def __len__(self) -> int:
        """Batches per epoch for this process (a resumed epoch yields fewer)."""
        if self.drop_last:
            total = sum(len(v) // self.batch_size for v in self.buckets.values())
        else:
            total = sum(math.ceil(len(v) / self.batch_size) for v in self.buckets.values())
        return self._per_rank(total)

    def __iter__(self) -> Iterator[list[SampleKey]]:
        """This epoch's batches from the current position. Iterating again after a finished
        epoch without calling `set_epoch` moves on to the next epoch (so a loop that never calls
        it still sees a new order each time); after `set_epoch` it yields what is left."""
        batches = self.rank_batches(self.epoch)
        if batches and self._position >= len(batches) and not self._explicit:
            self.epoch += 1
            self._position = 0
            batches = self.rank_batches(self.epoch)
        self._explicit = self._restored = False
        epoch = self.epoch
        for i in range(min(self._position, len(batches)), len(batches)):
            self._position = i + 1
            yield [SampleKey(epoch, index, i + 1) for index in batches[i]]

    # ---- position

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate, from its start. The one exception is the epoch just
        restored by `load_state_dict`, which keeps its position, so the usual
        `for epoch in range(start, n): sampler.set_epoch(epoch)` loop resumes mid-epoch."""
        if not (self._restored and epoch == self.epoch):
            self._position = 0
        self._restored = False
        self.epoch = epoch
        self._explicit = True

    @property
    def position(self) -> int:
        return self._position

    def state_dict(self) -> dict[str, int]:
        """The data position plus what it depends on. Counts batches *yielded*; when a
        DataLoader with workers prefetches, use `DataFeed.state_dict()`, which counts batches
        the training loop actually received."""
        return {"epoch": self.epoch, "batches_done": self._position, "seed": self.seed,
                "batch_size": self.batch_size, "num_replicas": self.num_replicas,
                "num_samples": self.num_samples, "num_batches": len(self)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        changed = [k for k in ("seed", "batch_size", "num_replicas", "num_samples")
                   if k in state and state[k] != getattr(self, k)]
        if changed:
            logger.warning("data position restored with different %s (%s); the batch order will "
                           "not match the interrupted run", ", ".join(changed),
                           ", ".join(f"{k}: {state[k]} -> {getattr(self, k)}" for k in changed))
        self.epoch = int(state["epoch"])
        self._position = int(state["batches_done"])
        self._restored = True
        self._explicit = False

"""Batches for the training loop: collation, SDXL time ids, and a DataLoader that knows the
exact data position for resume.

The loader takes any dataset with buckets (`BucketedDataset`); it does not import the dataset
module, and the dataset does not import this one, so the two change independently.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch.utils.data import DataLoader

from .sampler import BucketBatchSampler, SampleKey


class BucketedDataset(Protocol):
    """What batching needs from a dataset (`ImageCaptionDataset` is one): samples grouped by
    bucket, the seed the order derives from, a default batch size, and items by `SampleKey`."""

    seed: int
    batch_size: int
    bucket_samples: Mapping[Any, Sequence[int]]

    def __len__(self) -> int: ...

    def __getitem__(self, key: SampleKey) -> dict[str, Any]: ...


def make_batch_sampler(dataset: BucketedDataset, batch_size: int | None = None, *, num_replicas: int = 1,
                       rank: int = 0, shuffle: bool = True, drop_last: bool = False) -> BucketBatchSampler:
    """The per-epoch batch order of `dataset` for process `rank` of `num_replicas` (see
    `BucketBatchSampler`); `batch_size` defaults to the dataset's."""
    return BucketBatchSampler(dataset.bucket_samples, batch_size or dataset.batch_size, seed=dataset.seed,
                              num_replicas=num_replicas, rank=rank, shuffle=shuffle, drop_last=drop_last)


def make_loader(dataset: BucketedDataset, batch_size: int | None = None, *, num_replicas: int = 1,
                rank: int = 0, num_workers: int = 0, pin_memory: bool = False, shuffle: bool = True,
                drop_last: bool = False) -> BucketDataLoader:
    """The training loop's data: a `BucketDataLoader` over `dataset`, already sharded for
    process `rank` of `num_replicas` (do not pass it through `accelerator.prepare`).
    `batch_size` defaults to the dataset's. Fill the dataset's caches and call its `set_text`
    first: workers get their own copy of the dataset when iteration starts."""
    sampler = make_batch_sampler(dataset, batch_size, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                                 drop_last=drop_last)
    return BucketDataLoader(dataset, sampler, num_workers=num_workers, pin_memory=pin_memory)


def collate_samples(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack dataset items into a batch (all from one bucket, so shapes agree).

    Keys: `pixel_values` (B, 3, H, W) in [-1, 1] or `latents` (B, C, h, w); `captions` list[str];
    `original_size`, `crop_top_left`, `target_size` long (B, 2) as (height, width) / (top, left);
    `flipped`, `is_reg` bool (B,); `paths` list[str]; `indices` long (B,); `data_position`
    {"epoch", "batches_done"} after this batch; after the dataset's `set_text`, `input_ids`
    list of long (B, L), one per tokenizer; with the text cache `text_embeds` dict of (B, ...) tensors;
    in a masked run `mask` (B, 1, H, W) in [0, 1], at the pixel size, or the latent size when
    latents are cached.
    """
    first = items[0]
    batch: dict[str, Any] = {}
    for key in ("pixel_values", "latents", "mask"):
        if key in first:
            batch[key] = torch.stack([it[key] for it in items])
    batch["captions"] = [it["caption"] for it in items]
    for key in ("original_size", "crop_top_left", "target_size"):
        batch[key] = torch.tensor([it[key] for it in items], dtype=torch.long)
    batch["flipped"] = torch.tensor([it["flipped"] for it in items], dtype=torch.bool)
    batch["is_reg"] = torch.tensor([it["is_reg"] for it in items], dtype=torch.bool)
    batch["paths"] = [it["path"] for it in items]
    batch["indices"] = torch.tensor([it["index"] for it in items], dtype=torch.long)
    epoch, position = first["data_position"]
    batch["data_position"] = {"epoch": epoch, "batches_done": position}
    if "input_ids" in first:
        batch["input_ids"] = [torch.stack([it["input_ids"][t] for it in items])
                              for t in range(len(first["input_ids"]))]
    if "text_embeds" in first:
        batch["text_embeds"] = {name: torch.stack([it["text_embeds"][name] for it in items])
                                for name in first["text_embeds"]}
    return batch


def sdxl_add_time_ids(batch: Mapping[str, Any]) -> torch.Tensor:
    """SDXL's (B, 6) added time ids: original size, crop top-left, target size."""
    return torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], dim=1)


class BucketDataLoader:
    """A torch DataLoader over a `BucketBatchSampler` that knows the exact data position.

    The position is taken from the batches the loop has received (each batch carries it), not
    from how far workers have prefetched, so `state_dict()` saved after step N resumes at
    batch N + 1. Typical use::

        loader = make_loader(dataset, batch_size, num_replicas=acc.num_processes, rank=acc.process_index)
        loader.load_state_dict(checkpoint["data"])          # when resuming
        for epoch in range(first_epoch, epochs):
            loader.set_epoch(epoch)
            for batch in loader: ...; checkpoint["data"] = loader.state_dict()
    """

    def __init__(self, dataset: BucketedDataset, sampler: BucketBatchSampler, *,
                 num_workers: int = 0, pin_memory: bool = False) -> None:
        self.dataset = dataset
        self.sampler = sampler
        # A private generator: a DataLoader draws its worker base seed from the global RNG at
        # every new iterator, which would shift the training noise of a resumed run.
        self.loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_samples,
                                 num_workers=num_workers, pin_memory=pin_memory,
                                 generator=torch.Generator().manual_seed(sampler.seed))
        self._last: dict[str, int] | None = None

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.loader:
            self._last = dict(batch["data_position"])
            yield batch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self._last = None

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def state_dict(self) -> dict[str, int]:
        state = self.sampler.state_dict()
        if self._last is not None:
            state.update(self._last)
        return state

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.sampler.load_state_dict(state)
        self._last = None

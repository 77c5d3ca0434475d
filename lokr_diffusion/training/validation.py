"""Validation: held-out images scored by the training objective at fixed timesteps and noise.

The score is the run's own loss (`Objective.loss`: the family's target and weighting, min-SNR
included) with the random draws replaced: every image is noised at each configured timestep
with noise that depends only on `[validation] seed` and the image's index, so two evaluations
differ only by the adapter weights, whatever the batch size or the number of processes. The
noise is plain Gaussian (no `noise_offset`), which keeps runs with different noise settings
comparable.

Evaluating must not move the training stream: the global torch RNG is forked around it and the
adapter goes back to train mode, so a run with validation resumes exactly and trains the same
weights as one without.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..layers import drop_merged_copies

# a noise seed per image: seed * _SEED_STRIDE + image index (more images than this would reuse a seed
# of the next `seed`, which is harmless)
_SEED_STRIDE = 1_000_003
# augmentations a validation image never gets: its score must be the same at every evaluation
_NO_AUGMENTATION = {"flip": False, "random_crop": False, "shuffle_caption": False, "caption_dropout": 0.0,
                    "tag_dropout": 0.0}


def validation_dataset(v_cfg: Any, train_dataset: Any, batch_size: int, report: Callable[[str], None] | None):
    """The validation images as a dataset (None without `[validation]`): the training set's
    held-out images (`split`, already taken out by `build_dataset(hold_out=...)`), or a folder
    read with the first training dataset's conventions (`data_dir`). No augmentation, and each
    image once (a kohya `N_name` folder's repeats would weight the average)."""
    from ..data import ImageCaptionDataset, build_dataset

    if not v_cfg.enabled:
        return None
    configs = [dataclasses.replace(c, **_NO_AUGMENTATION) for c in train_dataset.configs]
    if v_cfg.split is not None:
        records = train_dataset.held_out
        if report is not None:
            report(f"validation: {len(records)} image(s) held out of the training set (split {v_cfg.split:g}, "
                   f"seed {v_cfg.seed})")
    else:
        template = next(c for c in configs if not c.is_reg)
        configs = [dataclasses.replace(template, dir=Path(v_cfg.data_dir), metadata_file=None, repeats=1,
                                       is_reg=False, name=f"[validation] data_dir ({v_cfg.data_dir})")]
        if report is not None:
            report("validation images:")
        records = build_dataset(configs, batch_size=batch_size, seed=v_cfg.seed, cache_dir=train_dataset.cache_dir,
                                report=report, max_image_pixels=train_dataset.max_image_pixels).records
    return ImageCaptionDataset(configs, [dataclasses.replace(r, repeats=1) for r in records], seed=v_cfg.seed,
                               cache_dir=train_dataset.cache_dir, batch_size=batch_size,
                               max_image_pixels=train_dataset.max_image_pixels)


def validation_noise(seed: int, index: int, shape: Sequence[int]) -> torch.Tensor:
    """The fixed noise of validation image `index` (float32, CPU): the same at every evaluation
    and on every device."""
    generator = torch.Generator().manual_seed(seed * _SEED_STRIDE + index)
    return torch.randn(tuple(shape), generator=generator)


def batch_indices(dataset: Any, batch_size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """This process's share of the validation batches: every bucket in order, cut into batches,
    dealt out round-robin (a process may get none)."""
    batches = [list(indices[i:i + batch_size]) for indices in dataset.bucket_samples.values()
               for i in range(0, len(indices), batch_size)]
    return batches[rank::world]


def score_batches(batches: Iterable[dict[str, Any]], objective: Any, denoise: Callable, latents_of: Callable,
                  timesteps: Sequence[int], seed: int, device: torch.device,
                  autocast: Callable[[], Any] = contextlib.nullcontext) -> tuple[torch.Tensor, int]:
    """Per timestep, the sum over images of the loss, and the number of images: the parts of the
    mean, so that processes can add theirs up before dividing.

    `denoise(noisy, timesteps, batch)` is the model's prediction, `latents_of(batch)` the
    batch's latents; the caller decides the mode (eval) and grad state."""
    sums = torch.zeros(len(timesteps), dtype=torch.float64)
    count = 0
    for batch in batches:
        latents = latents_of(batch).to(device, dtype=torch.float32)
        size = latents.shape[0]
        noise = torch.stack([validation_noise(seed, int(i), latents.shape[1:])
                             for i in batch["indices"]]).to(device)
        for k, t in enumerate(timesteps):
            steps = torch.full((size,), int(t), device=device, dtype=torch.long)
            with autocast():
                loss = objective.loss(latents, lambda noisy, ts: denoise(noisy, ts, batch), noise=noise,
                                      timesteps=steps)
            sums[k] += float(loss) * size
        count += size
    return sums, count


class Validator:
    """Scores the adapter on the validation images, on every process, reduced so all agree."""

    def __init__(self, accelerator: Any, dataset: Any, batch_size: int, objective: Any, model: Any, ema: Any,
                 network: Any, encoder: Callable, timesteps: Sequence[int], seed: int) -> None:
        scheduler = getattr(objective, "scheduler", None)
        limit = scheduler.config.num_train_timesteps if scheduler is not None else 1000
        too_late = [t for t in timesteps if t >= limit]
        if too_late:
            raise ConfigError(f"validation.timesteps: {too_late} beyond this model's {limit} training timesteps")
        self.accelerator, self.dataset, self.objective = accelerator, dataset, objective
        self.model, self.ema, self.network, self.encoder = model, ema, network, encoder
        self.timesteps, self.seed = list(timesteps), seed
        self.batches = batch_indices(dataset, batch_size, accelerator.process_index, accelerator.num_processes)

    def _batches(self) -> Iterator[dict[str, Any]]:
        from ..data import collate_samples

        for indices in self.batches:
            yield collate_samples([self.dataset[i] for i in indices])

    def _latents(self, batch: dict[str, Any]) -> torch.Tensor:
        return batch["latents"] if "latents" in batch else self.encoder(batch["pixel_values"])

    def evaluate(self) -> dict[str, float]:
        """`val_loss` (the mean over images and timesteps) and `val_loss/tNNN` per timestep; the
        weights scored are the EMA's when there is one, as saved."""
        accelerator = self.accelerator
        model = accelerator.unwrap_model(self.model)
        was_training = model.training
        device = accelerator.device
        forked = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=forked), torch.no_grad(), self._ema_weights():
            torch.default_generator.manual_seed(self.seed)  # anything drawn inside: the same at every evaluation
            if forked:
                torch.cuda.manual_seed(self.seed)  # this process's device only, the one forked
            model.eval()
            try:
                sums, count = score_batches(self._batches(), self.objective, model, self._latents, self.timesteps,
                                            self.seed, device, accelerator.autocast)
            finally:
                model.train(was_training)
                drop_merged_copies(self.network)  # the no-grad forwards' weight copies: memory for training
        totals = accelerator.reduce(torch.cat([sums, torch.tensor([float(count)], dtype=torch.float64)])
                                    .to(device), "sum").cpu()
        per_step = totals[:-1] / totals[-1]
        out = {"val_loss": float(per_step.mean())}
        out.update({f"val_loss/t{t:03d}": float(v) for t, v in zip(self.timesteps, per_step)})
        return out

    @contextlib.contextmanager
    def _ema_weights(self):
        """The EMA weights in place of the live ones, copied in and back with in-place copies that
        bump each parameter's version: EMAModel's own store/copy_to/restore write through `.data`,
        which leaves the version alone, so a layer's no-grad forward would keep using the merged
        weight it built from the previous values."""
        if self.ema is None:
            yield
            return
        params = list(self.network.parameters())
        live = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, shadow in zip(params, self.ema.shadow_params):
                p.copy_(shadow.to(p.device, p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, value in zip(params, live):
                    p.copy_(value)

"""The torch Dataset tying sources, buckets, captions, images and caches together.

Building a dataset scans and validates everything up front (folders, captions, every image's
pixels) so that bad data stops or is reported before any model is loaded; after that, items are
a pure function of (seed, epoch, sample index).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DatasetError
from ..text import CaptionExpander, tokenize
from .buckets import MIN_CROP_SHARE, BucketSpec, CropPlan, Size, crop_share, plan_crop
from .cache import CacheStats, LatentEncodeFn, TensorStore, TextEncodeFn, latent_cache_key, text_cache_key
from .captions import CaptionOptions, augment_caption, static_caption_variants
from .config import DatasetConfig
from .images import (DEFAULT_MAX_IMAGE_PIXELS, BadImageError, ImageInfo, load_grey, load_rgb_alpha, mask_to_tensor,
                     probe_image, resize_and_crop, to_tensor)
from .masks import find_mask, mask_identity, mask_to_latent_size
from .sampler import STREAM_CAPTION, STREAM_CROP, STREAM_FLIP, SampleKey, sample_rng
from .sources import SkippedFile, SourceImage, find_images

logger = logging.getLogger("lokr_diffusion.data")

Report = Callable[[str], None]

#: Most samples (image repeats, regularisation included) one epoch may hold. Samples are
#: expanded into index lists (about 50 bytes per sample across the dataset and the sampler), so
#: this caps that memory near 1 GiB; per-image repeats are capped separately (sources.MAX_REPEATS).
MAX_SAMPLES_PER_EPOCH = 20_000_000


def _check_epoch_size(samples: int, what: str) -> None:
    if samples > MAX_SAMPLES_PER_EPOCH:
        raise DatasetError(f"{what} add up to {samples} samples per epoch, more than the limit of "
                           f"{MAX_SAMPLES_PER_EPOCH}: lower repeats (folder <N>_ prefixes or `repeats`)")


@dataclass(frozen=True)
class ImageRecord:
    """One usable image, fully resolved: its caption, size, bucket and content hash."""

    path: Path
    caption: str  # before per-epoch augmentation
    config_index: int
    repeats: int  # samples per epoch (after regularisation balancing)
    is_reg: bool
    size: Size  # (w, h) after EXIF orientation
    bucket: Size  # (w, h)
    sha256: str
    mask_path: Path | None = None  # the mask file (conditioning_data_dir), checked at the scan
    mask_sha256: str | None = None


@dataclass
class ScanSummary:
    """What building the dataset found, for the start-of-run report."""

    skipped: list[SkippedFile] = field(default_factory=list)

    def skipped_by_reason(self) -> Counter[str]:
        return Counter(_reason_kind(s.reason) for s in self.skipped)


def _reason_kind(reason: str) -> str:
    for sep in (":", " ("):
        if sep in reason:
            reason = reason.split(sep, 1)[0]
    return reason.strip()


def balance_regularisation(train_samples: int, reg_repeats: Sequence[int]) -> list[int]:
    """Per-epoch repeats of each regularisation image, kohya style: walk the reg images in
    order, taking their own repeats, until they add up to as many samples as the training
    images; if one pass is not enough, further passes add one repeat per image. Reg images past
    the point where the count is reached get 0 (they are not used)."""
    result = [0] * len(reg_repeats)
    if not reg_repeats or train_samples <= 0:
        return result
    total, first_pass = 0, True
    while total < train_samples:
        for i, repeats in enumerate(reg_repeats):
            step = repeats if first_pass else 1
            result[i] += step
            total += step
            if total >= train_samples:
                break
        first_pass = False
    return result


class ImageCaptionDataset(Dataset):
    """Training samples: index `i` is one repeat of one image (repeats are expanded, kohya
    style, so each repeat gets its own augmentation).

    Items are dicts; see `collate_samples` for the batch layout. Index with a `SampleKey`
    (what `BucketBatchSampler` yields) or a plain int (epoch 0). Batches come from
    `make_loader(dataset, ...)` (module `loader`): the dataset knows nothing about loading, so
    either can change without the other.

    Text handling is given, not looked up: `set_text(tokenizers, expand_caption)` once the
    tokenizers exist (they come with the model, which loads after the data is scanned). Without
    it, items carry captions but no `input_ids`.
    """

    def __init__(self, configs: Sequence[DatasetConfig], records: Sequence[ImageRecord], *,
                 seed: int = 0, tokenizers: Sequence[Any] | None = None,
                 expand_caption: CaptionExpander | None = None,
                 cache_dir: Path | None = None, batch_size: int = 1,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                 summary: ScanSummary | None = None, masked: bool = False) -> None:
        _check_epoch_size(sum(rec.repeats for rec in records), "the datasets' images")
        self.configs = list(configs)
        self.records = list(records)
        self.seed = seed
        self._tokenizers: list[Any] | None = None
        self._expand_caption: CaptionExpander | None = None
        if tokenizers is not None:
            self.set_text(tokenizers, expand_caption)
        elif expand_caption is not None:
            raise ValueError("expand_caption needs tokenizers: it only changes the text that is tokenised")
        self.cache_dir = cache_dir
        self.batch_size = batch_size
        self.max_image_pixels = max_image_pixels
        self.summary = summary or ScanSummary()
        # items carry a loss mask: every dataset's, all ones where a dataset names no mask source
        self.masked = masked or any(c.mask_source for c in configs)
        self._caption_options = [CaptionOptions(c.caption_prefix, c.caption_suffix, c.shuffle_caption,
                                                c.keep_tokens, c.caption_dropout, c.tag_dropout)
                                 for c in self.configs]
        self.samples = [ri for ri, rec in enumerate(self.records) for _ in range(rec.repeats)]
        self.bucket_samples: dict[Size, list[int]] = {}
        for i, ri in enumerate(self.samples):
            self.bucket_samples.setdefault(self.records[ri].bucket, []).append(i)
        self.bucket_samples = dict(sorted(self.bucket_samples.items()))
        # latent cache state, filled by cache_latents
        modes = {c.cache_latents for c in self.configs}
        self.uses_latent_cache = modes != {"off"}
        self._latent_stores: list[TensorStore | None] = [None] * len(self.configs)
        self._latent_keys: dict[tuple[int, bool], str] = {}
        self._latents_ready = False
        # text cache state, filled by cache_text_embeddings
        self._text_store: TensorStore | None = None
        self._text_encoder_id: str | None = None

    # ---- text

    def set_text(self, tokenizers: Sequence[Any] | None, expand_caption: CaptionExpander | None = None) -> None:
        """Give items `input_ids`: each caption, after this epoch's augmentation and then
        `expand_caption` (e.g. `TriggerEmbedding.expand`, which turns a trained trigger word into
        its per-vector tokens), tokenised by each of `tokenizers` with `lokr_diffusion.text.tokenize`,
        the same function the trainer encodes caption lists with. `None` removes the text handling.

        One call instead of attributes the trainer assigns: the dataset is built before the
        model loads, and the tokenizers and trigger word only exist after it.
        """
        if tokenizers is None and expand_caption is not None:
            raise ValueError("expand_caption needs tokenizers: it only changes the text that is tokenised")
        self._tokenizers = list(tokenizers) if tokenizers is not None else None
        self._expand_caption = expand_caption

    @property
    def tokenizers(self) -> list[Any] | None:
        """The tokenizers items are tokenised with (set with `set_text`), or None."""
        return self._tokenizers

    # ---- size and layout

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def buckets(self) -> list[Size]:
        return list(self.bucket_samples)

    def center_plan(self, record: ImageRecord) -> CropPlan:
        return plan_crop(record.size, record.bucket)

    # ---- items

    def __getitem__(self, key: int | SampleKey | tuple[int, int]) -> dict[str, Any]:
        if isinstance(key, tuple):
            epoch, index = int(key[0]), int(key[1])
            position = int(key[2]) if len(key) > 2 else 0
        else:
            epoch, index, position = 0, int(key), 0
        if not 0 <= index < len(self.samples):
            raise IndexError(f"sample index {index} out of range (dataset has {len(self.samples)})")
        ri = self.samples[index]
        rec = self.records[ri]
        cfg = self.configs[rec.config_index]
        flip = bool(cfg.flip and sample_rng(self.seed, epoch, index, STREAM_FLIP).random() < 0.5)

        item: dict[str, Any] = {}
        if self.uses_latent_cache:
            if not self._latents_ready:
                raise RuntimeError("the dataset caches latents (cache_latents = "
                                   f"{cfg.cache_latents!r}): call dataset.cache_latents(encode, vae_id) "
                                   "before reading samples")
            plan = self.center_plan(rec)
            store = self._latent_stores[rec.config_index]
            assert store is not None
            entry = store.get(self._latent_keys[(ri, flip)])
            item["latents"] = entry["latents"]
            if self.masked:  # cached at the latent size (mask_to_latent_size)
                item["mask"] = entry.get("mask", torch.ones((1, *entry["latents"].shape[-2:])))
        else:
            crop_rng = sample_rng(self.seed, epoch, index, STREAM_CROP) if cfg.random_crop else None
            plan = plan_crop(rec.size, rec.bucket, random_crop=cfg.random_crop, rng=crop_rng)
            pixels, mask = self._pixels_and_mask(rec, plan, flip)
            item["pixel_values"] = pixels
            if self.masked:  # at the pixel size; the loss reduces it to the latent grid
                item["mask"] = mask if mask is not None else torch.ones((1, *pixels.shape[-2:]))

        caption = augment_caption(rec.caption, self._caption_options[rec.config_index],
                                  sample_rng(self.seed, epoch, index, STREAM_CAPTION))
        item["caption"] = caption
        # SDXL's added time ids, all (height, width) / (top, left) like the SDXL reference code.
        item["original_size"] = (rec.size[1], rec.size[0])
        item["crop_top_left"] = (plan.top, plan.flipped_left() if flip else plan.left)
        item["target_size"] = (rec.bucket[1], rec.bucket[0])
        item["flipped"] = flip
        item["is_reg"] = rec.is_reg
        item["path"] = str(rec.path)
        item["index"] = index
        item["data_position"] = (epoch, position)
        if self._tokenizers is not None:
            text = self._expand_caption(caption) if self._expand_caption else caption
            item["input_ids"] = [ids[0] for ids in tokenize(self._tokenizers, [text])]
        if self._text_store is not None:
            assert self._text_encoder_id is not None
            item["text_embeds"] = self._text_store.get(text_cache_key(caption=caption,
                                                                      encoder_id=self._text_encoder_id))
        return item

    def _pixels_and_mask(self, rec: ImageRecord, plan: CropPlan,
                         flip: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The sample's pixels, and its loss mask (1, H, W) in [0, 1] with the same resize, crop
        and flip when the run is masked and its dataset has a mask source (else None)."""
        cfg = self.configs[rec.config_index]
        try:
            img, alpha = load_rgb_alpha(rec.path, background=cfg.alpha_background, max_pixels=self.max_image_pixels)
        except BadImageError as exc:
            raise DatasetError(f"{rec.path}: {exc} (the file changed after the dataset was scanned)") from None
        if img.size != rec.size:
            raise DatasetError(f"{rec.path}: is now {img.size[0]}x{img.size[1]}, was {rec.size[0]}x"
                               f"{rec.size[1]} when the dataset was scanned")
        crop = (plan.top, plan.left)
        pixels = to_tensor(resize_and_crop(img, plan.resized, crop, plan.bucket, flip))
        source = cfg.mask_source if self.masked else None
        mask_img = alpha if source == "alpha" else self._mask_file(rec) if source == "folder" else None
        if mask_img is None:
            return pixels, None
        return pixels, mask_to_tensor(resize_and_crop(mask_img, plan.resized, crop, plan.bucket, flip))

    def _mask_file(self, rec: ImageRecord) -> Image.Image:
        assert rec.mask_path is not None
        try:
            mask = load_grey(rec.mask_path, max_pixels=self.max_image_pixels)
        except BadImageError as exc:
            raise DatasetError(f"mask {rec.mask_path} of image {rec.path}: {exc} (the file changed after the "
                               f"dataset was scanned)") from None
        if mask.size != rec.size:
            raise DatasetError(f"mask {rec.mask_path} is {mask.size[0]}x{mask.size[1]} but its image {rec.path} "
                               f"is {rec.size[0]}x{rec.size[1]}: a mask must have its image's size")
        return mask

    def _mask_id(self, rec: ImageRecord) -> str | None:
        """What the cache key says about the sample's mask (None: no mask is cached with it)."""
        source = self.configs[rec.config_index].mask_source if self.masked else None
        if source is None:
            return None
        return mask_identity("alpha") if source == "alpha" else mask_identity("file", rec.mask_sha256)

    # ---- latent cache

    def latent_variants(self, config_index: int) -> tuple[bool, ...]:
        """Which flips get a cached latent: both when `flip` is on (the VAE is not mirror
        symmetric, so a mirrored latent is not the latent of the mirrored image)."""
        return (False, True) if self.configs[config_index].flip else (False,)

    def cache_latents(self, encode: LatentEncodeFn, vae_id: str, *, batch_size: int = 8,
                      report: Report | None = None) -> CacheStats:
        """Encode every (image, flip) the dataset needs that is not cached yet.

        `encode(pixel_values)` gets a float32 CPU tensor (B, 3, H, W) in [-1, 1], all of one
        bucket, and returns latents (B, C, h, w) as the UNet should see them (already scaled;
        `VaeLatentEncoder` does this for a diffusers VAE). `vae_id` identifies the VAE and how it
        encodes (`VaeLatentEncoder.identity`); a different id is a different cache. Datasets with
        `cache_latents = "disk"` reuse files from earlier runs; "memory" ones keep latents in
        RAM for this run only. A no-op returning zero counts if no dataset caches latents.
        """
        if not self.uses_latent_cache:
            return CacheStats(0, 0)
        memory = TensorStore(None, "latents")  # one for all "memory" datasets: keys name the content
        for ci, cfg in enumerate(self.configs):
            if cfg.cache_latents == "disk":
                self._latent_stores[ci] = TensorStore(self._disk_cache_dir(cfg), "latents")
            else:
                self._latent_stores[ci] = memory
        # per store: the same image in two datasets (say, listed twice with other captions) must
        # reach each store its datasets read from
        todo: dict[tuple[int, str], tuple[int, bool]] = {}
        hits = 0
        seen: set[tuple[int, str]] = set()
        for ri, rec in enumerate(self.records):
            plan = self.center_plan(rec)
            cfg = self.configs[rec.config_index]
            for flip in self.latent_variants(rec.config_index):
                key = latent_cache_key(content_sha256=rec.sha256, bucket=rec.bucket, resized=plan.resized,
                                       crop_top_left=(plan.top, plan.left), flip=flip,
                                       background=cfg.alpha_background, vae_id=vae_id, mask=self._mask_id(rec))
                self._latent_keys[(ri, flip)] = key
                store = self._latent_stores[rec.config_index]
                assert store is not None
                if (id(store), key) in seen:
                    continue
                seen.add((id(store), key))
                if store.has(key):
                    hits += 1
                else:
                    todo[(id(store), key)] = (ri, flip)
        if report is not None:
            report(f"latent cache: {hits} cached, {len(todo)} to encode")
        by_bucket: dict[Size, list[tuple[str, int, bool]]] = {}
        for (_, key), (ri, flip) in todo.items():
            by_bucket.setdefault(self.records[ri].bucket, []).append((key, ri, flip))
        for bucket, jobs in sorted(by_bucket.items()):
            for start in range(0, len(jobs), batch_size):
                chunk = jobs[start:start + batch_size]
                loaded = [self._pixels_and_mask(self.records[ri], self.center_plan(self.records[ri]), flip)
                          for _, ri, flip in chunk]
                pixels = torch.stack([p for p, _ in loaded])
                latents = encode(pixels)
                if not isinstance(latents, torch.Tensor) or latents.shape[0] != len(chunk):
                    raise DatasetError(f"the latent encode function returned "
                                       f"{getattr(latents, 'shape', type(latents))} for {len(chunk)} images")
                for (key, ri, flip), latent, (_, mask) in zip(chunk, latents, loaded):
                    rec = self.records[ri]
                    store = self._latent_stores[rec.config_index]
                    assert store is not None
                    tensors = {"latents": latent}
                    if mask is not None:  # kept at the latent size: 1/64 of the pixels
                        tensors["mask"] = mask_to_latent_size(mask[None].float(), latent.shape[-2:])[0]
                    store.put(key, tensors, {"source": str(rec.path), "flip": str(flip),
                                                         "bucket": f"{bucket[0]}x{bucket[1]}",
                                                         "vae": vae_id})
        self._latents_ready = True
        return CacheStats(hits=hits, encoded=len(todo))

    def _disk_cache_dir(self, cfg: DatasetConfig) -> Path:
        directory = cfg.cache_dir or self.cache_dir
        if directory is None:
            raise DatasetError(f"{cfg.name}: cache_latents = \"disk\" needs a cache folder: set cache_dir "
                               f"(or let the trainer pass its output folder)")
        return directory

    # ---- text-encoder cache

    def cache_text_embeddings(self, encode_text: TextEncodeFn, encoder_id: str, *, batch_size: int = 32,
                              to_disk: bool = False, report: Report | None = None) -> CacheStats:
        """Encode every caption the dataset can produce, for runs that do not train the text
        encoders. Afterwards each item carries `text_embeds`, a dict of tensors as returned by
        `encode_text(list_of_captions)` (each with the captions on dim 0), one caption's slice.

        Only possible when captions are the same every epoch: shuffle_caption and tag_dropout
        must be off (caption_dropout is fine: the empty caption is cached too).
        """
        moving = [c.name for c in self.configs if not c.static_captions]
        if moving:
            raise DatasetError("text-encoder outputs cannot be cached when captions change every epoch "
                               f"(shuffle_caption or tag_dropout is on in {', '.join(moving)}); turn "
                               "those off or train/run the text encoders each step")
        directory = None
        if to_disk:
            directory = self.cache_dir or next((c.cache_dir for c in self.configs if c.cache_dir), None)
            if directory is None:
                raise DatasetError("caching text-encoder outputs on disk needs a cache folder: set cache_dir")
        store = TensorStore(directory, "text")
        captions = sorted({v for rec in self.records
                           for v in static_caption_variants(rec.caption, self._caption_options[rec.config_index])})
        todo = [c for c in captions if not store.has(text_cache_key(caption=c, encoder_id=encoder_id))]
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            outputs = dict(encode_text(chunk))
            for name, value in outputs.items():
                if not isinstance(value, torch.Tensor) or value.shape[0] != len(chunk):
                    raise DatasetError(f"the text encode function returned {name} with shape "
                                       f"{getattr(value, 'shape', type(value))} for {len(chunk)} captions")
            for i, caption in enumerate(chunk):
                store.put(text_cache_key(caption=caption, encoder_id=encoder_id),
                          {name: value[i] for name, value in outputs.items()},
                          {"caption": caption, "encoder": encoder_id})
        self._text_store = store
        self._text_encoder_id = encoder_id
        stats = CacheStats(hits=len(captions) - len(todo), encoded=len(todo))
        if report is not None:
            report(f"text-encoder cache: {stats}")
        return stats

    # ---- reporting

    def bucket_table(self, batch_size: int | None = None) -> str:
        """A plain-text table of buckets: resolution, images, samples per epoch (with repeats)."""
        batch_size = batch_size or self.batch_size
        rows = []
        totals = [0, 0, 0, 0]
        for bucket, indices in self.bucket_samples.items():
            recs = {self.samples[i] for i in indices}
            images = len(recs)
            reg = sum(1 for ri in recs if self.records[ri].is_reg)
            batches = -(-len(indices) // batch_size)
            rows.append((f"{bucket[0]}x{bucket[1]}", f"{bucket[0] / bucket[1]:.2f}", images, reg,
                         len(indices), batches))
            for j, v in enumerate((images, reg, len(indices), batches)):
                totals[j] += v
        header = ("resolution", "aspect", "images", "reg", "samples/epoch (repeats)", "batches")
        rows.append(("total", "", *totals))
        widths = [max(len(str(r[c])) for r in [header, *rows]) for c in range(len(header))]
        lines = ["  ".join(str(v).rjust(w) for v, w in zip(row, widths)) for row in [header, *rows]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.insert(len(lines) - 1, lines[1])
        return "\n".join(lines)

    def describe(self) -> str:
        """Start-of-run summary: datasets, bucket table, skipped files."""
        out = []
        for ci, cfg in enumerate(self.configs):
            recs = [r for r in self.records if r.config_index == ci]
            kind = " (regularisation)" if cfg.is_reg else ""
            masks = ""
            if self.masked:
                masks = {"alpha": ", loss masks from the alpha channel",
                         "folder": f", loss masks from {cfg.conditioning_data_dir}"}.get(
                    cfg.mask_source or "", ", no loss masks (every pixel trains)")
            out.append(f"dataset {ci + 1}{kind}: {cfg.name}: {len(recs)} images, "
                       f"{sum(r.repeats for r in recs)} samples per epoch{masks}")
        out.append(self.bucket_table())
        skipped = self.summary.skipped
        if skipped:
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self.summary.skipped_by_reason().items()))
            out.append(f"skipped {len(skipped)} file{'s' if len(skipped) != 1 else ''}: {kinds}")
        else:
            out.append("skipped 0 files")
        return "\n".join(out)


# --------------------------------------------------------------------------------------------
# building


def build_dataset(configs: Sequence[DatasetConfig], *, batch_size: int = 1, seed: int = 0,
                  tokenizers: Sequence[Any] | None = None, expand_caption: CaptionExpander | None = None,
                  cache_dir: str | Path | None = None,
                  report: Report | None = print, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                  verify_images: bool = True, scan_workers: int | None = None,
                  masked_loss: bool = False) -> ImageCaptionDataset:
    """Scan, validate and bucket every dataset; call before loading any model.

    `cache_dir` is where "disk" latent caches go for datasets without their own `cache_dir`
    (the trainer passes e.g. `<output>/cache`). `report` receives the start-of-run summary and
    bucket table (pass None on non-main processes). `tokenizers` and `expand_caption`, when the
    caller already has them, are the same as calling `set_text` on the result (the trainer
    calls `set_text` later, once the model is loaded). Unusable files are skipped with one logged
    warning each; a missing folder, an empty dataset, a caption rule that cannot be satisfied or
    inconsistent cache settings raise DatasetError.

    Items carry a loss `mask` when `masked_loss` (the trainer's `train.masked_loss`) is on or a
    dataset names a mask source (`alpha_mask`, `conditioning_data_dir`); a missing or mis-sized
    mask file raises DatasetError naming the image and the mask.
    """
    if not configs:
        raise DatasetError("no datasets configured: add a [[data.datasets]] table with a `dir`")
    if masked_loss and not any(c.mask_source for c in configs):
        raise DatasetError("train.masked_loss is on but no dataset gives loss masks: set alpha_mask = true or "
                           "conditioning_data_dir (a folder of mask images) under [data] or in a [[data.datasets]] "
                           "entry")
    modes = {c.cache_latents != "off" for c in configs}
    if len(modes) > 1:
        raise DatasetError("cache_latents must be on (memory or disk) for every dataset or for none: "
                           "a batch cannot mix cached latents and raw pixels; set it under [data]")
    workers = scan_workers if scan_workers is not None else min(8, os.cpu_count() or 1)
    summary = ScanSummary()
    records: list[ImageRecord] = []
    for ci, cfg in enumerate(configs):
        records.extend(_scan_config(ci, cfg, summary, max_image_pixels, verify_images, workers))

    train_samples = sum(r.repeats for r in records if not r.is_reg)
    # before balancing: it walks the regularisation images until they match this count
    _check_epoch_size(train_samples, "the training images")
    if train_samples == 0:
        raise DatasetError("only regularisation datasets (is_reg = true) were found: add at least one "
                           "training dataset")
    reg_idx = [i for i, r in enumerate(records) if r.is_reg]
    if reg_idx:
        balanced = balance_regularisation(train_samples, [records[i].repeats for i in reg_idx])
        for i, repeats in zip(reg_idx, balanced):
            records[i] = _replace_repeats(records[i], repeats)
        records = [r for r in records if r.repeats > 0]

    dataset = ImageCaptionDataset(configs, records, seed=seed, tokenizers=tokenizers,
                                  expand_caption=expand_caption, cache_dir=Path(cache_dir) if cache_dir is not None else None,
                                  batch_size=batch_size, max_image_pixels=max_image_pixels, summary=summary,
                                  masked=masked_loss)
    if report is not None:
        report(dataset.describe())
    for bucket, indices in dataset.bucket_samples.items():
        images = len({dataset.samples[i] for i in indices})
        if images < batch_size:
            what = (f"its only batch holds {len(indices)}" if len(indices) < batch_size
                    else "its batches repeat images")
            logger.warning("bucket %dx%d has %d image%s (%d samples per epoch), fewer than batch size %d: "
                           "%s; none are dropped", bucket[0], bucket[1], images, "s" if images != 1 else "",
                           len(indices), batch_size, what)
    return dataset


def _replace_repeats(rec: ImageRecord, repeats: int) -> ImageRecord:
    return dataclasses.replace(rec, repeats=repeats)


def _skip(summary: ScanSummary, path: Path, reason: str) -> None:
    summary.skipped.append(SkippedFile(path, reason))
    logger.warning("skipped %s: %s", path, reason)


def _scan_config(ci: int, cfg: DatasetConfig, summary: ScanSummary, max_image_pixels: int | None,
                 verify: bool, workers: int) -> list[ImageRecord]:
    scan = find_images(cfg)
    skipped_before = len(summary.skipped)
    for s in scan.skipped:
        _skip(summary, s.path, s.reason)

    mask_dir = cfg.conditioning_data_dir
    if mask_dir is not None and not mask_dir.is_dir():
        raise DatasetError(f"{cfg.name}: conditioning_data_dir {mask_dir.resolve()} is not a folder (expected the "
                           f"loss masks: one image per training image, with its name)")
    root = cfg.dir if cfg.dir is not None else cfg.metadata_file.parent if cfg.metadata_file else Path(".")

    def probe(src: SourceImage) -> tuple[ImageInfo, tuple[Path, str] | None] | BadImageError:
        try:
            info = probe_image(src.path, max_pixels=max_image_pixels, verify=verify)
        except BadImageError as exc:
            return exc
        if mask_dir is None:
            return info, None
        return info, find_mask(src.path, (info.width, info.height), root, mask_dir, max_pixels=max_image_pixels)

    if workers > 1 and len(scan.images) > 16:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            infos = list(pool.map(probe, scan.images))
    else:
        infos = [probe(src) for src in scan.images]

    spec = BucketSpec(cfg.resolution, cfg.enable_bucket, cfg.min_bucket_reso, cfg.max_bucket_reso,
                      cfg.bucket_step, cfg.bucket_no_upscale)
    buckets = spec.buckets()
    records: list[ImageRecord] = []
    no_caption: list[Path] = []
    no_alpha = 0
    for src, probed in zip(scan.images, infos):
        if isinstance(probed, BadImageError):
            _skip(summary, src.path, str(probed))
            continue
        info, mask = probed
        size = (info.width, info.height)
        bucket = spec.assign(size, buckets)
        share = crop_share(size, bucket)
        if share < MIN_CROP_SHARE:
            _skip(summary, src.path, f"aspect ratio too extreme: {size[0]}x{size[1]} in its nearest allowed "
                                     f"bucket {bucket[0]}x{bucket[1]} would keep {share:.1%} of the image "
                                     f"(less than {MIN_CROP_SHARE:.2%}); crop it or widen min/max_bucket_reso")
            continue
        caption = src.caption
        if caption is None:
            if cfg.missing_caption == "class_token" and src.class_token:
                caption = src.class_token
            elif cfg.missing_caption == "empty":
                caption = ""
            else:
                no_caption.append(src.path)
                continue
        no_alpha += cfg.alpha_mask and not info.has_alpha
        records.append(ImageRecord(src.path, caption, ci, src.repeats, cfg.is_reg, size, bucket, info.sha256,
                                   *(mask or (None, None))))
    if no_caption:
        examples = ", ".join(str(p) for p in no_caption[:3]) + (" ..." if len(no_caption) > 3 else "")
        if cfg.missing_caption == "error":
            raise DatasetError(f"{cfg.name}: {len(no_caption)} image(s) have no caption or an empty one "
                               f"(missing_caption = \"error\"): {examples}")
        raise DatasetError(f"{cfg.name}: {len(no_caption)} image(s) have no caption and no class token: "
                           f"{examples}; add {cfg.caption_extension} files, set class_token, name the folder "
                           f"<repeats>_<token>, or set missing_caption = \"empty\"")
    if no_alpha:
        logger.warning("%s: alpha_mask is on but %d of %d images have no alpha channel: they train on every pixel",
                       cfg.name, no_alpha, len(records))
    if not records:
        reasons = ""
        skipped_here = len(summary.skipped) - skipped_before
        if skipped_here:
            reasons = f"; {skipped_here} file(s) were found but skipped (see the warnings above)"
        notes = "".join(f"; {n}" for n in scan.notes)
        raise DatasetError(f"{cfg.name}: no usable images (looked for {scan.looked_for}){reasons}{notes}")
    return records


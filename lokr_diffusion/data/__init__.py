"""Training data for lokr-diffusion: finding, checking, bucketing, augmenting and caching images.

Everything here runs before any model is loaded, so bad data costs seconds, not a model load.

Trainer-facing flow
-------------------
::

    from lokr_diffusion.data import (dataset_configs_from_toml, build_dataset, make_loader,
                                     VaeLatentEncoder, sdxl_add_time_ids)

    configs = dataset_configs_from_toml(toml["data"], base_dir=config_path.parent,
                                        extra_keys=())            # DatasetError on bad keys
    dataset = build_dataset(configs, batch_size=4, seed=seed,
                            cache_dir=output_dir / "cache",         # default for "disk" caches
                            report=print if is_main else None)      # prints the bucket table
    # ... load models ...
    dataset.set_text([tok] or [tok1, tok2],                        # items get input_ids
                     expand_caption=embedding.expand)              # optional, e.g. a trigger word
    if dataset.uses_latent_cache:                                  # cache_latents = memory/disk
        enc = VaeLatentEncoder(vae)                                # or any encode(pixels)->latents
        dataset.cache_latents(enc, enc.identity, batch_size=8)
    if not train_text_encoder:                                     # optional
        dataset.cache_text_embeddings(lambda caps: {"prompt_embeds": ...}, encoder_id)
    loader = make_loader(dataset, num_replicas=acc.num_processes, rank=acc.process_index,
                         num_workers=2)                            # do NOT accelerator.prepare it
    loader.load_state_dict(ckpt["data"])                           # exact resume (optional)
    for epoch in range(first_epoch, epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            ...
            ckpt["data"] = loader.state_dict()

Batch keys (`collate_samples`)
------------------------------
* `pixel_values` float (B, 3, H, W) in [-1, 1] — when latents are not cached; or
* `latents` (B, C, H/f, W/f), as returned by the encode function (already scaled);
* `captions` list[str], after prefix/suffix, shuffling and dropouts for this epoch;
* `original_size`, `crop_top_left`, `target_size` long (B, 2) — SDXL's added time ids, in the
  (height, width) and (top, left) order of the SDXL reference code; `sdxl_add_time_ids(batch)`
  concatenates them to (B, 6); `crop_top_left` is measured in the mirrored image when flipped;
* `flipped`, `is_reg` bool (B,); `paths` list[str]; `indices` long (B,) sample indices;
* `data_position` {"epoch", "batches_done"}: where the stream is once this batch is done;
* `input_ids` list of long (B, L), one per tokenizer given to `dataset.set_text` (or
  `build_dataset(tokenizers=...)`), padded to `tokenizer.model_max_length` by
  `lokr_diffusion.text.tokenize`, the trainer's own tokenisation;
* `text_embeds` dict of (B, ...) tensors, after `cache_text_embeddings`.
* `mask` float (B, 1, H, W) in [0, 1] in a masked run (module `masks`, docs/data.md): at the pixel size,
  or at the latent size (B, 1, h, w) when latents are cached.
All samples of a batch come from one bucket, so H and W are the same within a batch.

Example data
------------
`make_example_dataset(out_dir, n=20, seed=0)` (module `example`) draws the committed
`assets/example_dataset/`: coloured shapes with captions, deterministic, license-clean.

Config keys (`[data]` defaults, `[[data.datasets]]` entries)
-------------------------------------------------------------
dir, metadata_file, recursive, repeats, is_reg, class_token, caption_extension, caption_prefix,
caption_suffix, shuffle_caption, keep_tokens, caption_dropout, tag_dropout, missing_caption
("class_token" | "empty" | "error"), resolution (int or [w, h]), enable_bucket, min_bucket_reso,
max_bucket_reso, bucket_step, bucket_no_upscale, random_crop, flip, cache_latents
("memory" | "disk" | "off"), cache_dir, and alpha_background (colour transparent images are
composited on: "white", "black", "grey", "#rrggbb" or [r, g, b]; default white), alpha_mask and
conditioning_data_dir (loss masks, below).

Semantics worth knowing
-----------------------
* Repeats: kohya's. A `10_name` subfolder of `dir` repeats its images 10 times per epoch
  (times the entry's `repeats`), and "name" is their class token. Regularisation images are
  balanced to the number of training samples the way kohya does (`balance_regularisation`).
* Determinism: order depends on (seed, epoch); every augmentation (flip, random crop, caption
  shuffle and dropouts) on (seed, epoch, sample index), never on global RNG state or workers.
* Latent caching fixes the crop, so `random_crop` with `cache_latents` is a config error. With
  `flip`, both the image and its mirror are encoded and cached (twice the encode work, exact
  latents for both), and each epoch picks one per sample.
* Cache files are safetensors written atomically, keyed by image content hash, bucket, resize,
  crop, flip, alpha background and VAE identity: renaming or touching an image reuses its
  latents, editing it re-encodes that image only, and a different VAE gets its own entries.
* Text-encoder outputs can only be cached when captions are static (no shuffle_caption, no
  tag_dropout); the empty caption is cached too when caption_dropout > 0.
* Bad files (unreadable, zero-byte, truncated, not an image, decompression bomb, caption not
  UTF-8) are skipped with one warning line each on the "lokr_diffusion.data" logger and counted
  in the summary; a missing folder or a dataset with no usable image raises DatasetError.
* Only regular files are read (symlinks followed): an image or caption that is a named pipe,
  a device (a link to /dev/zero) or a socket is skipped with a warning without being opened for
  reading, so nothing can block the scan. Caps, each named in its message: captions 64 KiB
  (`captions.MAX_CAPTION_BYTES`, image skipped), image files 512 MiB
  (`images.DEFAULT_MAX_IMAGE_BYTES`, skipped) and DEFAULT_MAX_IMAGE_PIXELS pixels, applied at the
  scan and at every later load; metadata.jsonl 64 MiB (`sources.MAX_METADATA_BYTES`) — a
  metadata file that is too big or not a regular file raises DatasetError.
* Repeats: at most 10 000 per image (`sources.MAX_REPEATS`: folder <N>_ times `repeats`) and
  20 000 000 samples per epoch (`dataset.MAX_SAMPLES_PER_EPOCH`); more raises DatasetError
  naming the folder or setting, since repeats are expanded into one index per sample.
* Buckets always respect min_bucket_reso and max_bucket_reso. With bucket_no_upscale, an image
  whose own step-aligned size would break them (a 20000x20 strip) takes the nearest regular
  bucket and is enlarged after all. An image whose crop to its bucket would keep less than 1/16
  of it (`buckets.MIN_CROP_SHARE`, only extreme aspect ratios) is skipped with a warning.
"""
from .buckets import BucketSpec, CropPlan, cover_size, make_buckets, nearest_bucket, plan_crop
from .cache import (
    CACHE_FORMAT,
    CacheStats,
    TensorStore,
    VaeLatentEncoder,
    latent_cache_key,
    module_identity,
    save_tensors_atomic,
    text_cache_key,
)
from .captions import CaptionOptions, augment_caption, decode_caption_bytes, split_tags
from .config import DatasetConfig, dataset_configs_from_toml
from .dataset import ImageCaptionDataset, ImageRecord, balance_regularisation, build_dataset
from .images import DEFAULT_MAX_IMAGE_PIXELS, IMAGE_EXTENSIONS, BadImageError, load_rgb, probe_image, to_rgb
from .loader import BucketDataLoader, BucketedDataset, collate_samples, make_batch_sampler, make_loader, sdxl_add_time_ids
from .sampler import BucketBatchSampler, SampleKey, sample_rng
from .sources import SkippedFile, SourceImage, find_images, parse_repeat_folder

__all__ = [
    "BadImageError", "BucketBatchSampler", "BucketDataLoader", "BucketSpec", "BucketedDataset", "CACHE_FORMAT",
    "CacheStats", "CaptionOptions", "CropPlan", "DEFAULT_MAX_IMAGE_PIXELS", "DatasetConfig",
    "IMAGE_EXTENSIONS", "ImageCaptionDataset", "ImageRecord", "SampleKey", "SkippedFile",
    "SourceImage", "TensorStore", "VaeLatentEncoder", "augment_caption", "balance_regularisation",
    "build_dataset", "collate_samples", "cover_size", "dataset_configs_from_toml",
    "decode_caption_bytes", "find_images", "latent_cache_key", "load_rgb", "make_buckets",
    "make_batch_sampler", "make_example_dataset", "make_loader", "module_identity", "nearest_bucket", "parse_repeat_folder", "plan_crop",
    "probe_image", "sample_rng", "save_tensors_atomic", "sdxl_add_time_ids", "split_tags",
    "text_cache_key", "to_rgb",
]


def __getattr__(name: str):
    # Imported lazily so `python -m lokr_diffusion.data.example` does not import itself twice.
    if name == "make_example_dataset":
        from .example import make_example_dataset
        return make_example_dataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

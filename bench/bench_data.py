"""Images per second through the data pipeline, with and without the latent cache.

Runs on the committed example dataset (assets/example_dataset) with a tiny randomly initialised
diffusers AutoencoderKL, so it needs no downloads. A real Stable Diffusion VAE is hundreds of
times slower to run than this one, so the gap between "encode every step" and "cached" is far
larger in real training than what is printed here.

    python bench/bench_data.py [--epochs 5] [--batch-size 4] [--resolution 128] [--workers 0]
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from lokr_diffusion.data import DatasetConfig, VaeLatentEncoder, build_dataset, make_loader

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "example_dataset"


def tiny_vae() -> torch.nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                         layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=64).eval()


def run_epochs(dataset, epochs: int, batch_size: int, workers: int, per_batch=None) -> tuple[int, float]:
    loader = make_loader(dataset, batch_size, num_workers=workers)
    images = 0
    start = time.perf_counter()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            if per_batch is not None:
                per_batch(batch)
            images += len(batch["captions"])
    return images, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    args = parser.parse_args(argv)
    logging.getLogger("lokr_diffusion.data").setLevel(logging.ERROR)  # the small-bucket notes

    encoder = VaeLatentEncoder(tiny_vae())
    rows: list[tuple[str, int, float]] = []

    def config(cache: str, cache_dir: Path | None = None) -> DatasetConfig:
        return DatasetConfig(dir=ASSETS, resolution=args.resolution, min_bucket_reso=args.resolution // 2,
                             max_bucket_reso=args.resolution * 2, bucket_step=32, flip=True,
                             cache_latents=cache, cache_dir=cache_dir)

    def build(cache: str, cache_dir: Path | None = None):
        return build_dataset([config(cache, cache_dir)], batch_size=args.batch_size, report=None)

    plain = build("off")
    rows.append(("no cache: load, resize, crop (pixels only)",
                 *run_epochs(plain, args.epochs, args.batch_size, args.workers)))
    rows.append(("no cache: pixels + VAE encode every batch",
                 *run_epochs(plain, args.epochs, args.batch_size, args.workers,
                             per_batch=lambda b: encoder(b["pixel_values"]))))

    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = Path(tmp)
        ds = build("disk", cache_dir)
        start = time.perf_counter()
        stats = ds.cache_latents(encoder, encoder.identity)
        rows.append((f"disk cache, first run: fill ({stats.encoded} encodes, both flips)", stats.encoded,
                     time.perf_counter() - start))
        rows.append(("disk cache, training epochs", *run_epochs(ds, args.epochs, args.batch_size, args.workers)))
        ds = build("disk", cache_dir)
        start = time.perf_counter()
        stats = ds.cache_latents(encoder, encoder.identity)
        rows.append((f"disk cache, second run: check ({stats.hits} hits, {stats.encoded} encodes)",
                     stats.hits, time.perf_counter() - start))

    ds = build("memory")
    ds.cache_latents(encoder, encoder.identity)
    rows.append(("memory cache, training epochs", *run_epochs(ds, args.epochs, args.batch_size, args.workers)))

    print(f"{len(plain.records)} images, {len(plain)} samples/epoch, {args.epochs} epochs, batch size "
          f"{args.batch_size}, resolution {args.resolution}, {args.workers} workers, "
          f"{torch.get_num_threads()} torch threads, tiny random VAE\n")
    print("| pipeline | images | seconds | images/s |")
    print("|---|---:|---:|---:|")
    for name, images, seconds in rows:
        print(f"| {name} | {images} | {seconds:.3f} | {images / seconds:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

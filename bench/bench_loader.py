"""Loading an adapter into a Diffusers pipeline: load time, and inference cost unfused / fused.

One run, one pipeline: an SD1.5-structured UNet at reduced width (block channels 128/256/512/512)
with the tiny pipeline's VAE and text encoder, on the CPU. Base, unfused and fused runs are
interleaved and repeated; the table reports medians and ratios to the base, because a shared
machine's speed drifts. Writes docs/benchmarks/loader.md.

    python bench/bench_loader.py [--repeats 5] [--steps 4] [--size 256]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lokr_diffusion import AdapterConfig, create_network, fuse_adapter, load_adapter, unfuse_adapter, unload_adapter
from lokr_diffusion.families import get_family

ROOT = Path(__file__).resolve().parent.parent


def build_pipeline(folder: Path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    get_family("sd15").build_tiny(folder, seed=0)
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    cfg = get_family("sd15").tiny_unet_config()
    cfg.update(block_out_channels=[128, 256, 512, 512], attention_head_dim=8, norm_num_groups=32)
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel(**cfg).eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_adapter(pipe, path: Path) -> Path:
    cfg = AdapterConfig(algo="lokr", preset="full", factor=8, dim=10000, conv_dim=10000)
    net = create_network(cfg, unet=pipe.unet, text_encoders=[pipe.text_encoder])
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.01)
    net.save(path)
    net.remove()
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_pipeline(Path(tmp) / "pipe")
        adapter = make_adapter(pipe, Path(tmp) / "a.safetensors")

        def infer() -> float:
            g = torch.Generator().manual_seed(0)
            t0 = time.perf_counter()
            with torch.no_grad():
                pipe("a red circle", num_inference_steps=args.steps, height=args.size, width=args.size, generator=g,
                     output_type="latent")
            return time.perf_counter() - t0

        infer()  # warm-up
        load, base, first, unfused, fused = [], [], [], [], []
        for _ in range(args.repeats):
            base.append(infer())
            t0 = time.perf_counter()
            report = load_adapter(pipe, adapter)
            load.append(time.perf_counter() - t0)
            first.append(infer())  # builds each layer's merged weight once
            unfused.append(infer())
            fuse_adapter(pipe)
            fused.append(infer())
            unfuse_adapter(pipe)
            unload_adapter(pipe)
    med = {k: statistics.median(v) for k, v in dict(load=load, base=base, first=first, unfused=unfused, fused=fused).items()}
    lines = [
        "# Adapter loading and inference in a Diffusers pipeline", "",
        f"`python bench/bench_loader.py --repeats {args.repeats} --steps {args.steps} --size {args.size}`, CPU, "
        f"{args.threads} threads, torch {torch.__version__}. SD1.5-structured UNet at block channels 128/256/512/512, "
        f"LoKr factor 8 full-matrix on the `full` preset ({sum(report.patched.values())} modules: "
        f"{report.patched}), {args.steps}-step text-to-image at {args.size}x{args.size} with guidance; "
        f"medians of {args.repeats} interleaved repeats.", "",
        "| measure | median (s) | vs base | target |", "|---|---|---|---|",
        f"| load_adapter (read, check, attach) | {med['load']:.3f} | | |",
        f"| inference, base | {med['base']:.3f} | 1.00x | |",
        f"| inference, adapter unfused, first run after loading (builds the merged weights) | {med['first']:.3f} | "
        f"{med['first'] / med['base']:.2f}x | |",
        f"| inference, adapter unfused | {med['unfused']:.3f} | {med['unfused'] / med['base']:.2f}x | <= 1.05x |",
        f"| inference, adapter fused | {med['fused']:.3f} | {med['fused'] / med['base']:.2f}x | 1.00x |", "",
    ]
    text = "\n".join(lines)
    (ROOT / "docs" / "benchmarks").mkdir(parents=True, exist_ok=True)
    (ROOT / "docs" / "benchmarks" / "loader.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()

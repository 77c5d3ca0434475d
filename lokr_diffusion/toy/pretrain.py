"""Pretrain the toy base model from nothing: a VAE, then a UNet and text encoder, on CPU.

Why it exists: fine-tuning a *random* tiny model only shows a falling loss. A base model that
already draws the toy world (a coloured circle, square or triangle on a coloured background,
at one of five positions, as its caption says) lets the quickstart show an adapter teaching it
something it could not draw before. The result ships in `assets/toy/model/`, so nobody has to
run this to use the quickstart; it is here so the asset can be rebuilt and checked.

Two stages, both full-parameter training with AdamW:
1. the VAE as an autoencoder (L1 reconstruction plus a tiny KL term) on random crops of the
   840 base images (it is fully convolutional, and crops cost a quarter of whole images);
2. the UNet and CLIP text encoder jointly on the cached latents with the trainer's own
   denoising objective (`lokr_diffusion.training.loss`: v-prediction on a zero-terminal-SNR
   schedule, see `model.build_scheduler`), 10% empty captions so classifier-free guidance
   works, and an EMA of the weights. The loss is the plain v-prediction MSE: min-SNR weighting
   would give the noisiest timesteps, where only the caption says what to draw, almost no weight.

Determinism: all randomness comes from one seed (each stage re-seeds with it), and training
runs on one thread, where every CPU kernel sums in a fixed order, so the same torch version
writes byte-identical files (a test checks a short run). `torch.use_deterministic_algorithms`
is not switched on: on the CPU it only swaps in slower kernels (about 2x here) for a guarantee
one thread already gives. More threads are faster on an idle machine but may change the last
bits.
"""
from __future__ import annotations

import copy
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.optimization import get_cosine_schedule_with_warmup

from ..families.clip_tokenizer import tokenizer_files, write_tiny_tokenizer
from ..tools.outputs import atomic_folder
from . import generator as gen
from .model import build_scheduler, build_text_encoder, build_unet, build_vae

__all__ = ["PretrainSettings", "pretrain", "save_pipeline"]


@dataclass
class PretrainSettings:
    seed: int = 0
    threads: int = 1
    vae_steps: int = 1500
    vae_batch: int = 16
    vae_crop: int = 32
    vae_lr: float = 2e-3
    kl_weight: float = 1e-6
    unet_steps: int = 3000
    unet_batch: int = 32
    unet_lr: float = 2e-3
    warmup_steps: int = 100
    caption_dropout: float = 0.1
    ema_decay: float = 0.995
    min_snr_gamma: float | None = None  # min-SNR weights the high-noise steps, where the caption sets the layout, near 0
    noise_offset: float = 0.0
    log_every: int = 100


def _images(scenes: list[gen.Scene]) -> torch.Tensor:
    """(N, 3, 64, 64) in [-1, 1], the VAE's input range."""
    arr = np.stack([np.asarray(gen.render(s)) for s in scenes]).astype(np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0


def train_vae(images: torch.Tensor, s: PretrainSettings, log: Callable[[str], None]):
    vae = build_vae()
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, s.warmup_steps, s.vae_steps)
    n, _, size, _ = images.shape
    start = time.perf_counter()
    for step in range(s.vae_steps):
        idx = torch.randint(0, n, (s.vae_batch,))
        ox, oy = torch.randint(0, size - s.vae_crop + 1, (2,)).tolist()  # one crop window per batch
        x = images[idx, :, oy:oy + s.vae_crop, ox:ox + s.vae_crop]
        dist = vae.encode(x).latent_dist
        recon = vae.decode(dist.sample()).sample
        rec = F.l1_loss(recon, x)
        loss = rec + s.kl_weight * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % s.log_every == 0 or step + 1 == s.vae_steps:
            log(f"vae  step {step + 1:5d}/{s.vae_steps}  l1 {rec.item():.4f}  {time.perf_counter() - start:6.0f}s")
    vae.eval()
    return vae


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Distribution modes, unscaled (the trainer's VaeLatentEncoder does the same, then scales)."""
    return torch.cat([vae.encode(images[i:i + batch]).latent_dist.mode() for i in range(0, len(images), batch)])


def train_unet(latents: torch.Tensor, captions: list[str], tokenizer, s: PretrainSettings,
               log: Callable[[str], None], on_log: Callable[[int, Any, Any], None] | None = None):
    """`on_log(step, unet_ema, text_encoder_ema)` (copies with the EMA weights) runs at each log
    line, for watching sample quality during experiments."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    from ..training.loss import denoising_loss

    unet, text_encoder = build_unet(), build_text_encoder(tokenizer)
    noise_scheduler = DDPMScheduler.from_config(build_scheduler().config)  # keeps zero SNR and v-prediction
    prediction = noise_scheduler.config.prediction_type
    ids = tokenizer(captions + [""], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    empty = len(captions)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=s.unet_lr, weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(opt, s.warmup_steps, s.unet_steps)
    ema_unet = EMAModel(unet.parameters(), decay=s.ema_decay)
    ema_text = EMAModel(text_encoder.parameters(), decay=s.ema_decay)
    unet.train()
    text_encoder.train()
    n = len(latents)
    start, running = time.perf_counter(), []
    for step in range(s.unet_steps):
        idx = torch.randint(0, n, (s.unet_batch,))
        drop = torch.rand(s.unet_batch) < s.caption_dropout
        batch_ids = ids[torch.where(drop, torch.full_like(idx, empty), idx)]
        x0 = latents[idx]
        cond = text_encoder(batch_ids)[0]
        loss = denoising_loss(x0, lambda noisy, t: unet(noisy, t, encoder_hidden_states=cond).sample,
                              noise_scheduler, prediction, noise_offset=s.noise_offset, min_snr_gamma=s.min_snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema_unet.step(unet.parameters())
        ema_text.step(text_encoder.parameters())
        running.append(loss.item())
        if (step + 1) % s.log_every == 0 or step + 1 == s.unet_steps:
            log(f"unet step {step + 1:5d}/{s.unet_steps}  loss {np.mean(running):.4f}  "
                f"{time.perf_counter() - start:6.0f}s")
            running = []
            if on_log is not None:
                unet_copy, text_copy = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
                ema_unet.copy_to(unet_copy.parameters())
                ema_text.copy_to(text_copy.parameters())
                on_log(step + 1, unet_copy, text_copy)
    ema_unet.copy_to(unet.parameters())
    ema_text.copy_to(text_encoder.parameters())
    unet.eval()
    text_encoder.eval()
    return unet, text_encoder


def save_pipeline(out_dir: Path, vae, text_encoder, tokenizer, unet) -> Path:
    """A standard Diffusers StableDiffusionPipeline folder (safetensors), as `load_pipeline` reads."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=build_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    # as in models.build_tiny_pipeline: keep the slow-tokenizer files next to tokenizer.json
    for fname in ("vocab.json", "merges.txt"):
        (out_dir / "tokenizer" / fname).write_text(tokenizer_files("<|endoftext|>")[fname], encoding="utf-8")
    return out_dir


def pretrain(out_dir: str | Path, settings: PretrainSettings | None = None,
             log: Callable[[str], None] = print, scenes: list[gen.Scene] | None = None) -> Path:
    """Train the toy model and write it to `out_dir`; returns the folder.

    `scenes` defaults to every base scene; tests pass a handful with a few steps.
    """
    import transformers

    s = settings or PretrainSettings()
    scenes = scenes if scenes is not None else gen.base_scenes()
    threads = torch.get_num_threads()
    torch.set_num_threads(s.threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s.seed)
            images = _images(scenes)
            vae = train_vae(images, s, log)
            vae_seconds = time.perf_counter() - started
            latents = encode_latents(vae, images)
            scale = float(1.0 / latents.std())
            vae.register_to_config(scaling_factor=scale)
            with tempfile.TemporaryDirectory() as tok_tmp:
                tokenizer = transformers.CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(tok_tmp)))
            torch.manual_seed(s.seed)  # each stage starts from the seed, independent of the other's draws
            unet, text_encoder = train_unet(latents * scale, [sc.caption for sc in scenes], tokenizer, s, log)
    finally:
        torch.set_num_threads(threads)
    total, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    record = {"settings": asdict(s), "images": len(scenes), "latent_scaling_factor": scale,
              "seconds": {"vae": round(vae_seconds, 1), "total": round(total, 1), "cpu": round(cpu, 1)},
              "torch": torch.__version__}
    with atomic_folder(out_dir, overwrite=True) as tmp:  # an interrupted save keeps the old model whole
        save_pipeline(tmp, vae, text_encoder, tokenizer, unet)
        (tmp / "toy_pretrain.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    out = Path(out_dir)
    log(f"pretrained in {total:.0f}s wall, {cpu:.0f}s CPU (vae {vae_seconds:.0f}s wall); wrote {out}")
    return out

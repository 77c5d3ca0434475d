"""The training run, top to bottom: config -> data -> models -> adapters -> loop -> files.

Everything that can be checked without a model (config, datasets) is checked first.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from ..memory import peak_memory_gib
from .config import TrainConfig

logger = logging.getLogger("lokr_diffusion.train")

_SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Progress:
    """What Accelerate cannot know about the run: saved with every checkpoint."""

    step: int = 0
    epoch: int = 0
    data: dict | None = None
    nonfinite_in_a_row: int = 0
    nonfinite_total: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "data": self.data or {},
                "nonfinite_in_a_row": self.nonfinite_in_a_row, "nonfinite_total": self.nonfinite_total}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.data = dict(state.get("data") or {}) or None
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
        self.nonfinite_total = int(state.get("nonfinite_total", 0))


from .stop import StopRequested, TrainingStopped  # noqa: E402 - signals: see stop.py


def train(cfg: TrainConfig, config_path: Path | None = None, break_lock: bool = False) -> Path:
    """Run a training job; returns the path of the final adapter file."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from ..data import VaeLatentEncoder, build_dataset, dataset_configs_from_toml, make_loader, module_identity
    from ..embeddings import TriggerEmbedding, embedding_path
    from ..fileformat import atomic_write_bytes
    from ..families import family_of_pipeline
    from ..models import load_pipeline
    from ..network import create_network
    from . import checkpoint
    from .loss import denoising_loss
    from ..text import tokenize
    from .model import TrainingModel
    from .optim import build_optimizer
    from .sampling import sample_grids

    t_cfg, out_cfg = cfg.train, cfg.output
    output_dir = cfg.output_dir

    # 1. data: validated and scanned before any model loads
    # Several processes without CUDA (accelerate launch --multi_gpu / torchrun on a CPU machine):
    # Accelerate only picks its gloo CPU backend when told the run is on the CPU.
    cpu_processes = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=cpu_processes,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.network.module_dropout > 0)],
        mixed_precision=t_cfg.mixed_precision,
        gradient_accumulation_steps=t_cfg.gradient_accumulation_steps,
        log_with="tensorboard" if cfg.logging.tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    if t_cfg.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ConfigError("train.mixed_precision = 'fp16' needs a GPU; use 'bf16' or 'no' on the CPU")
    main = accelerator.is_main_process
    logging.basicConfig(level=logging.INFO if main else logging.WARNING, format="%(message)s")
    from .lock import lock_output_dir
    lock_output_dir(accelerator, output_dir, break_lock=break_lock)  # one run per folder; refuses unusable paths
    dataset_configs = dataset_configs_from_toml(cfg.data, base_dir=cfg.base_dir)
    dataset = build_dataset(dataset_configs, batch_size=t_cfg.batch_size, seed=t_cfg.seed,
                            cache_dir=output_dir / "cache", report=print if main else None)
    set_seed(t_cfg.seed, device_specific=True)

    # 2. base model
    pretrained = cfg.model.pretrained_model
    if (cfg.base_dir / pretrained).exists():  # local paths are relative to the config file
        pretrained = str((cfg.base_dir / pretrained).resolve())
    pipe = load_pipeline(pretrained, family=cfg.model.family, revision=cfg.model.revision,
                         variant=cfg.model.variant, prediction_type=cfg.model.prediction_type)
    family = family_of_pipeline(pipe)
    parts = family.components(pipe)
    unet, vae, text_encoders, tokenizers = parts.denoiser, parts.vae, parts.text_encoders, parts.tokenizers
    prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
    # a model pretrained on a zero-terminal-SNR schedule says so in its scheduler config; fine-tune it on the same
    model_zero_snr = bool(pipe.scheduler.config.get("rescale_betas_zero_snr", False))
    zero_snr = t_cfg.zero_terminal_snr or model_zero_snr
    if zero_snr and prediction_type != "v_prediction":
        raise ConfigError("train.zero_terminal_snr needs v-prediction (model.prediction_type = 'v_prediction')")
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type,
                                                rescale_betas_zero_snr=zero_snr)
    if zero_snr and not model_zero_snr:  # the sampling scheduler must match what training switched on
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, rescale_betas_zero_snr=True)
    max_t = t_cfg.max_timestep or noise_scheduler.config.num_train_timesteps
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[t_cfg.mixed_precision]
    for m in (unet, vae, *text_encoders):
        m.requires_grad_(False).eval()
    unet.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=torch.float32)  # the VAE overflows in fp16
    for te in text_encoders:
        te.to(accelerator.device, dtype=weight_dtype)
    if t_cfg.xformers:
        if accelerator.device.type == "cuda":
            try:
                unet.enable_xformers_memory_efficient_attention()
            except Exception as exc:  # not installed or not built for this GPU
                logger.warning("xformers requested but unavailable (%s); using torch attention", exc)
        else:
            logger.warning("xformers needs CUDA; using torch attention")
    if t_cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if cfg.network.train_text_encoder:
            for te in text_encoders:
                te.gradient_checkpointing_enable()

    # 3. caches, now that the tokenizers and VAE exist (and the trigger word's new tokens)
    embedding = None
    if cfg.network.embedding_trigger:
        embedding = TriggerEmbedding(cfg.network.embedding_trigger, tokenizers, text_encoders,
                                     cfg.network.embedding_vectors).to(accelerator.device)
    dataset.set_text(tokenizers, embedding.expand if embedding is not None else None)
    encoder = VaeLatentEncoder(vae)
    if dataset.uses_latent_cache:
        with accelerator.main_process_first():  # the main process encodes, the others read its cache
            dataset.cache_latents(encoder, encoder.identity)

    # 4. adapters
    network = create_network(cfg.network.adapter_config(), unet=unet if cfg.network.train_unet else None,
                             text_encoders=text_encoders if cfg.network.train_text_encoder else (), family=family,
                             prediction_type=prediction_type)
    network.to(accelerator.device, dtype=torch.float32)
    model = model_for_text = TrainingModel(network, unet, text_encoders, family, cfg.network.train_text_encoder,
                                           embedding)
    if not model.train_text_encoder and all(c.static_captions for c in dataset.configs):
        def encode_captions(captions: list[str]) -> dict[str, torch.Tensor]:
            with torch.no_grad(), accelerator.autocast():
                embeds = model_for_text.encode_text(tokenize(tokenizers, captions))
            return {k: v.float().cpu() for k, v in embeds.items()}

        dataset.cache_text_embeddings(encode_captions, "|".join(module_identity(t) for t in text_encoders))
    groups = []
    unet_params = [p for k, a in network.named_children() if network.components[k] == "unet" for p in a.parameters()]
    te_params = [p for k, a in network.named_children() if network.components[k] != "unet" for p in a.parameters()]
    if unet_params:
        groups.append({"params": unet_params, "lr": t_cfg.unet_lr or t_cfg.learning_rate})
    if te_params:
        groups.append({"params": te_params, "lr": t_cfg.text_encoder_lr or t_cfg.learning_rate})
    if embedding is not None:  # no weight decay: it would pull the vectors to zero, not to the word's start
        groups.append({"params": list(embedding.parameters()), "weight_decay": 0.0,
                       "lr": t_cfg.embedding_learning_rate})
    optimizer = build_optimizer(t_cfg.optimizer, groups, t_cfg.learning_rate, t_cfg.weight_decay)

    loader = make_loader(dataset, num_replicas=accelerator.num_processes, rank=accelerator.process_index,
                         num_workers=t_cfg.num_workers)
    steps_per_epoch = max(1, math.ceil(len(loader) / t_cfg.gradient_accumulation_steps))
    max_steps = t_cfg.max_steps or t_cfg.epochs * steps_per_epoch
    num_epochs = t_cfg.epochs or sys.maxsize  # with max_steps alone, epochs run until the steps are done
    lr_scheduler = get_scheduler(t_cfg.lr_scheduler, optimizer,
                                 num_warmup_steps=t_cfg.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_steps * accelerator.num_processes)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    ema = EMAModel(network.parameters(), decay=t_cfg.ema_decay) if t_cfg.ema_decay else None
    progress = Progress()
    if ema is not None:
        ema.to(accelerator.device)

    # 5. resume (progress and EMA are saved as JSON/safetensors by checkpoint.TrainingState, never pickled)
    states = checkpoint.TrainingState(accelerator, output_dir, progress, ema, checkpoint.run_identity(
        cfg, network, [unet, *text_encoders], family, accelerator.num_processes))
    states.resume(t_cfg.resume, loader, report=print if main else (lambda _: None))

    trigger_note = ""
    if embedding is not None:
        trigger_note = f" + trigger embedding {embedding.word!r} ({embedding.num_vectors} vectors per text encoder)"
    if main:
        output_dir.mkdir(parents=True, exist_ok=True)
        resolved = json.dumps(cfg.to_dict(), indent=2, default=str)
        atomic_write_bytes(output_dir / "config.json", resolved.encode())
        print(f"config:\n{resolved}")
        print(f"family {family.variant(prediction_type)}, prediction {prediction_type}{', zero terminal SNR' if zero_snr else ''}, "
              f"{len(network.module_keys())} modules, "
              f"{network.num_parameters():,} trainable parameters{trigger_note}, {max_steps} steps "
              f"({steps_per_epoch} per epoch, {accelerator.num_processes} process(es))")
    if cfg.logging.tensorboard:
        accelerator.init_trackers("lokr-diffusion", config={k: v for k, v in _flat(cfg.to_dict()).items()})

    save_dtype = _SAVE_DTYPES[out_cfg.save_dtype]
    state_bytes = 4 * 4 * network.num_parameters()  # weights, two optimizer moments, EMA (fp32)
    meta_facts = {"ss_sd_model_name": cfg.model.pretrained_model,
                  "ss_v_parameterization": str(prediction_type == "v_prediction"),
                  "ss_learning_rate": t_cfg.learning_rate, "ss_unet_lr": t_cfg.unet_lr or t_cfg.learning_rate,
                  "ss_text_encoder_lr": t_cfg.text_encoder_lr or t_cfg.learning_rate,
                  "ss_batch_size_per_device": t_cfg.batch_size, "ss_gradient_accumulation_steps": t_cfg.gradient_accumulation_steps,
                  "ss_lr_scheduler": t_cfg.lr_scheduler, "ss_optimizer": t_cfg.optimizer, "ss_seed": t_cfg.seed,
                  "ss_mixed_precision": t_cfg.mixed_precision, "ss_min_snr_gamma": t_cfg.min_snr_gamma,
                  "ss_noise_offset": t_cfg.noise_offset, "ss_num_train_images": len(dataset.samples),
                  "ss_datasets": json.dumps(dataset.summary_dict() if hasattr(dataset, "summary_dict") else
                                            {"samples_per_epoch": len(dataset), "images": len(dataset.samples)}),
                  "ss_training_started_at": str(time.time()), "ss_max_train_steps": max_steps}

    def save_adapter(path: Path) -> Path:
        facts = dict(meta_facts, ss_steps=progress.step, ss_epoch=progress.epoch)
        if ema is not None:
            ema.store(network.parameters())
            ema.copy_to(network.parameters())
        try:
            if embedding is not None:
                embedding.save(embedding_path(path))
            return network.save(path, dtype=save_dtype, metadata=network.metadata(title=out_cfg.name, extra=facts))
        finally:
            if ema is not None:
                ema.restore(network.parameters())

    def save_checkpoint() -> None:
        if main:
            save_adapter(checkpoint.adapter_path(output_dir, out_cfg.name, progress.step))
        states.save(progress.step, state_bytes)
        if main:
            checkpoint.prune(output_dir, out_cfg.name, out_cfg.keep_last)

    def sample() -> None:
        if main and cfg.sample.prompts:
            s = cfg.sample
            network.eval()
            grids = sample_grids(pipe, s.prompts, output_dir / "samples", progress.step,
                                 negative_prompt=s.negative_prompt, steps=s.steps, guidance_scale=s.guidance_scale,
                                 seed=s.seed, num_images=s.num_images, width=s.width, height=s.height,
                                 device=accelerator.device, autocast=accelerator.autocast)
            network.train()
            tracker = _tensorboard(accelerator)
            if tracker is not None:
                for i, (prompt, _, array) in enumerate(grids):
                    tracker.writer.add_image(f"samples/{i:02d}", array, progress.step, dataformats="HWC")
        accelerator.wait_for_everyone()

    # 6. the loop
    stop = StopRequested()
    stop.install()
    bar = tqdm(total=max_steps, initial=progress.step, disable=not main, desc="training", dynamic_ncols=True)
    start, start_step = time.perf_counter(), progress.step
    model.train()
    while progress.step < max_steps and progress.epoch < num_epochs:
        loader.set_epoch(progress.epoch)  # a just-restored epoch keeps its position
        for batch in loader:
            with accelerator.accumulate(model):
                with torch.no_grad():
                    latents = batch["latents"] if "latents" in batch else encoder(batch["pixel_values"])
                    latents = latents.to(accelerator.device, dtype=torch.float32)
                weights = None
                if t_cfg.prior_loss_weight != 1.0:
                    weights = torch.where(batch["is_reg"], t_cfg.prior_loss_weight, 1.0)
                loss = denoising_loss(latents, lambda noisy, timesteps: model(noisy, timesteps, batch),
                                      noise_scheduler, prediction_type, noise_offset=t_cfg.noise_offset,
                                      min_timestep=t_cfg.min_timestep, max_timestep=max_t,
                                      min_snr_gamma=t_cfg.min_snr_gamma, sample_weights=weights)
                finite = accelerator.reduce(torch.isfinite(loss.detach()).float().reshape(1), "min").item() > 0
                if not finite:
                    optimizer.zero_grad(set_to_none=True)
                    _nonfinite(progress, t_cfg.max_nonfinite_steps, "loss", main)
                    continue
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(network.parameters(), t_cfg.max_grad_norm or float("inf"))
                    if not torch.isfinite(torch.as_tensor(grad_norm)) and t_cfg.mixed_precision != "fp16":
                        optimizer.zero_grad(set_to_none=True)
                        _nonfinite(progress, t_cfg.max_nonfinite_steps, "gradient", main)
                        continue
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            progress.step += 1
            progress.nonfinite_in_a_row = 0
            progress.data = loader.state_dict()
            if ema is not None:
                ema.step(network.parameters())
            loss_value = accelerator.reduce(loss.detach().reshape(1), "mean").item()
            lr = lr_scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            if progress.step % cfg.logging.log_every_steps == 0:
                logs = {"loss": loss_value, "lr": lr}
                if grad_norm is not None:
                    logs["grad_norm"] = float(grad_norm)
                accelerator.log(logs, step=progress.step)
            if out_cfg.save_every_steps and progress.step % out_cfg.save_every_steps == 0 and progress.step < max_steps:
                save_checkpoint()
            if cfg.sample.every_steps and progress.step % cfg.sample.every_steps == 0:
                sample()
            if _stop_everywhere(accelerator, stop):
                save_checkpoint()
                raise TrainingStopped(
                    f"stopped by signal {stop.signal} at step {progress.step}; checkpoint saved in "
                    f"{checkpoint.state_dir(output_dir, progress.step)}. Resume with: "
                    f"{_resume_command(config_path)}")
            if progress.step >= max_steps:
                break
        else:
            progress.epoch += 1
            progress.data = loader.state_dict() if progress.step < max_steps else progress.data
            if out_cfg.save_every_epochs and progress.epoch % out_cfg.save_every_epochs == 0 and progress.step < max_steps:
                save_checkpoint()
            continue
        break
    bar.close()

    # 7. the result
    final = checkpoint.adapter_path(output_dir, out_cfg.name)
    if main:
        save_adapter(final)
    states.save(progress.step, state_bytes)
    if main:
        checkpoint.prune(output_dir, out_cfg.name, out_cfg.keep_last)
    if cfg.sample.prompts:
        sample()
    agree = _ranks_agree(accelerator, network)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.num_processes > 1:
        # Freeing the DDP reducer tears the gloo process group down while its worker thread may
        # still need the GIL: a deadlock. Keep them alive; main() exits the process directly.
        _KEEP_UNTIL_EXIT.append((model, accelerator))
    if main:
        elapsed = time.perf_counter() - start
        steps = progress.step - start_step
        peak, peak_label = peak_memory_gib(accelerator.device)
        print(f"done: {progress.step} steps ({steps / elapsed if elapsed > 0 else 0:.2f} steps/s this run), "
              f"peak memory {'unavailable' if peak is None else f'{peak:.2f} GiB'} ({peak_label}), "
              f"{network.num_parameters():,} trainable parameters, "
              f"{progress.nonfinite_total} non-finite steps skipped\n"
              f"adapter {'identical' if agree else 'DIFFERENT'} on all {accelerator.num_processes} process(es)\n"
              f"adapter: {final}")
    return final


_KEEP_UNTIL_EXIT: list = []


def _ranks_agree(accelerator, network) -> bool:
    """Whether every process ends with the same adapter tensors (DDP should guarantee it)."""
    with torch.no_grad():
        flat = torch.cat([p.detach().double().flatten() for p in network.parameters()])
        fingerprint = torch.stack([flat.sum(), (flat * torch.arange(1, flat.numel() + 1, dtype=torch.float64,
                                                                     device=flat.device)).sum()]).reshape(1, 2)
    everyone = accelerator.gather(fingerprint)
    return bool((everyone == everyone[0]).all())


def _nonfinite(progress: Progress, limit: int, what: str, main: bool) -> None:
    progress.nonfinite_in_a_row += 1
    progress.nonfinite_total += 1
    if main:
        logger.warning("non-finite %s at step %d: step skipped (%d in a row)", what, progress.step + 1,
                       progress.nonfinite_in_a_row)
    if progress.nonfinite_in_a_row >= limit:
        raise FloatingPointError(f"{limit} non-finite {what} values in a row at step {progress.step + 1}: stopping. "
                                 "Lower train.learning_rate, check the data, or use bf16/fp32 instead of fp16.")


def _stop_everywhere(accelerator, stop: StopRequested) -> bool:
    flag = torch.tensor([1.0 if stop.signal is not None else 0.0], device=accelerator.device)
    return accelerator.reduce(flag, "max").item() > 0


def _resume_command(config_path: Path | None) -> str:
    cfg = str(config_path) if config_path else "<config.toml>"
    return f"accelerate launch train.py --config {cfg} --set train.resume=latest"


def _tensorboard(accelerator):
    """The TensorBoard tracker, or None: with [logging] tensorboard = false Accelerate hands back
    a blank GeneralTracker without a writer, which crashed the first sample step."""
    try:
        tracker = accelerator.get_tracker("tensorboard", unwrap=False)
    except Exception:
        return None
    return tracker if hasattr(tracker, "writer") else None


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


def main(argv: list[str] | None = None) -> int:
    """`train.py` / `lokr-diffusion train`: parse --config and --set, run, report errors plainly."""
    import argparse

    from ..errorhandling import run_guarded
    from .config import load_config
    from .lock import release_all

    parser = argparse.ArgumentParser(prog="train.py", description="Train a LoKr/LoHa/LoRA adapter.")
    add_train_arguments(parser)
    args = parser.parse_args(argv)

    def run() -> int:
        cfg = load_config(args.config, args.set)
        train(cfg, Path(args.config), break_lock=args.break_lock)
        if _KEEP_UNTIL_EXIT:  # a multi-process run: skip the interpreter's teardown (see train)
            release_all()  # os._exit skips atexit and finally
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        return 0

    return run_guarded("train", run)


def add_train_arguments(parser) -> None:
    from .config import add_help_config_argument

    parser.add_argument("--config", required=True, help="TOML config file (see train_configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (read as TOML; a bare word is a string); repeatable")
    add_help_config_argument(parser)
    parser.add_argument("--break-lock", action="store_true",
                        help="take over the output folder even if its lock names a live run or another host "
                             "(also: LOKR_DIFFUSION_BREAK_LOCK=1); a stale lock is taken over without it")

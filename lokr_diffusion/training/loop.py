"""The training run in named phases, top to bottom: run -> data -> models -> caches -> adapters ->
loop -> result. `train` reads as that list; each phase is a function below it, in order.

Everything that can be checked without a model (config, datasets) is checked first.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ConfigError
from ..memory import peak_memory_gib
from .config import TrainConfig

if TYPE_CHECKING:
    from ..families import Family
    from .model import TrainingModel
    from .objective import Objective

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
    """Run a training job; returns the path of the final adapter file.

    The phases run in this order because each needs the one before: the data is checked before a
    model loads; caches need the tokenizers and the VAE; the adapters must exist before the text
    cache (a trained text encoder is never cached) and the optimizer.
    """
    run = start_run(cfg, config_path, break_lock)
    dataset = prepare_data(run)
    models = load_models(run)
    embedding, encoder = fill_caches(run, dataset, models)
    parts = attach_adapters(run, dataset, models, embedding, encoder)
    return finish(run, models, parts, train_loop(run, dataset, models, parts))


# -- 1. the run: accelerator, output folder, logging ---------------------------------------------

@dataclass
class Run:
    cfg: TrainConfig
    config_path: Path | None
    accelerator: Any
    validation: Any = None  # the validation images (an ImageCaptionDataset), with [validation]

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def output_dir(self) -> Path:
        return self.cfg.output_dir

    def report(self, message: str) -> None:
        if self.main:
            print(message)


def start_run(cfg: TrainConfig, config_path: Path | None, break_lock: bool) -> Run:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    from .lock import lock_output_dir
    from .logs import trackers
    from .precision import resolve_mixed_precision

    t_cfg, output_dir = cfg.train, cfg.output_dir
    # unset: Accelerate's choice; set: the config's, said aloud when Accelerate asked otherwise (precision.py).
    # Resolved here, once, so the weights' dtype, the metadata and the resume check read one word.
    t_cfg.mixed_precision, precision_notice = resolve_mixed_precision(t_cfg.mixed_precision)
    # Several processes without CUDA (accelerate launch --multi_gpu / torchrun on a CPU machine):
    # Accelerate only picks its gloo CPU backend when told the run is on the CPU.
    cpu_processes = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=cpu_processes,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=cfg.network.module_dropout > 0)],
        mixed_precision=t_cfg.mixed_precision,
        gradient_accumulation_steps=t_cfg.gradient_accumulation_steps,
        log_with=trackers(cfg, output_dir),
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    if t_cfg.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ConfigError("mixed precision 'fp16' (train.mixed_precision, or Accelerate's setting when the key is "
                          "unset) needs a GPU; use 'bf16' or 'no' on the CPU")
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING, format="%(message)s")
    if precision_notice and accelerator.is_main_process:
        logger.warning(precision_notice)
    _warn_unsharded(accelerator)
    lock_output_dir(accelerator, output_dir, break_lock=break_lock)  # one run per folder; refuses unusable paths
    return Run(cfg, config_path, accelerator)


def _warn_unsharded(accelerator) -> None:
    """An FSDP or DeepSpeed launch config that Accelerate did not apply (it runs them on GPUs
    only; on the CPU the processes train data-parallel over gloo): the run is correct, but every
    process holds the whole frozen model, which is what the user chose sharding to avoid."""
    from accelerate.utils import DistributedType

    for env, kind in (("ACCELERATE_USE_FSDP", DistributedType.FSDP), ("ACCELERATE_USE_DEEPSPEED", DistributedType.DEEPSPEED)):
        if os.environ.get(env, "false").lower() == "true" and accelerator.distributed_type != kind:
            if accelerator.is_main_process:
                logger.warning("the launch config asks for %s, but Accelerate runs it on GPUs only; this run is %s on %s "
                               "with the whole frozen model on every process", kind.value, accelerator.distributed_type.value,
                               accelerator.device.type)
            return


# -- 2. data: validated and scanned before any model loads ---------------------------------------

def prepare_data(run: Run):
    from accelerate.utils import set_seed

    from ..data import build_dataset, dataset_configs_from_toml
    from .validation import validation_dataset

    cfg = run.cfg
    dataset = build_dataset(dataset_configs_from_toml(cfg.data, base_dir=cfg.base_dir), batch_size=cfg.train.batch_size,
                            seed=cfg.train.seed, cache_dir=run.output_dir / "cache",
                            report=print if run.main else None, masked_loss=cfg.train.masked_loss,
                            hold_out=cfg.validation.split or 0.0, hold_out_seed=cfg.validation.seed)
    run.validation = validation_dataset(cfg.validation, dataset, cfg.validation.batch_size or cfg.train.batch_size,
                                        print if run.main else None)
    set_seed(cfg.train.seed, device_specific=True)
    return dataset


# -- 3. the base model and the objective ---------------------------------------------------------

@dataclass
class Models:
    """The loaded pipeline's parts as the run uses them, and what the family says about them."""

    pipe: Any
    family: "Family"
    denoiser: nn.Module
    vae: nn.Module | None
    text_encoders: list[nn.Module]
    tokenizers: list[Any]
    objective: "Objective"
    prediction_type: str
    weight_dtype: torch.dtype
    parked: bool = False  # text encoders and VAE moved off the device once their outputs are cached
    text_options: dict[str, Any] = field(default_factory=dict)  # encode_text arguments ([train] clip_skip)

    def park(self) -> None:
        """Move the text encoders and the VAE to the CPU: every output they give is cached."""
        for m in (self.vae, *self.text_encoders):
            if m is not None:
                m.to("cpu")
        self.parked = True

    @contextlib.contextmanager
    def whole_pipeline(self, device: torch.device):
        """Sampling needs every part on the device; parked parts go back afterwards."""
        if self.parked:
            for m in (self.vae, *self.text_encoders):
                if m is not None:
                    m.to(device)
        try:
            yield self.pipe
        finally:
            if self.parked:
                self.park()


def load_models(run: Run) -> Models:
    from ..families import family_of_pipeline
    from ..models import load_pipeline
    from .model import text_options
    from .objective import build_objective

    cfg, accelerator, t_cfg = run.cfg, run.accelerator, run.cfg.train
    pretrained = cfg.model.pretrained_model
    if (cfg.base_dir / pretrained).exists():  # local paths are relative to the config file
        pretrained = str((cfg.base_dir / pretrained).resolve())
    pipe = load_pipeline(pretrained, family=cfg.model.family, revision=cfg.model.revision,
                         variant=cfg.model.variant, prediction_type=cfg.model.prediction_type)
    family = family_of_pipeline(pipe)
    if cfg.sample_prompts:  # a sample size the model cannot make stops the run now, not at the first sample
        from .prompts import check_sizes
        from .sampling import size_multiple

        check_sizes(cfg.sample_prompts, cfg.sample.width, cfg.sample.height, size_multiple(pipe, family), family.title)
    parts = family.components(pipe)
    objective = build_objective(family, pipe, t_cfg)
    prediction_type = getattr(objective, "prediction_type", family.default_prediction)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[t_cfg.mixed_precision]
    denoiser, vae, text_encoders = parts.denoiser, parts.vae, parts.text_encoders
    for m in (denoiser, vae, *text_encoders):
        m.requires_grad_(False).eval()
    _place_denoiser(denoiser, accelerator.device, weight_dtype, cfg.model.base_dtype)
    _place(vae, accelerator.device, torch.float32)  # the VAE overflows in fp16
    for te in text_encoders:
        _place(te, accelerator.device, weight_dtype)
    if t_cfg.xformers:
        if accelerator.device.type == "cuda":
            try:
                denoiser.enable_xformers_memory_efficient_attention()
            except Exception as exc:  # not installed or not built for this GPU
                logger.warning("xformers requested but unavailable (%s); using torch attention", exc)
        else:
            logger.warning("xformers needs CUDA; using torch attention")
    if t_cfg.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
        if cfg.network.train_text_encoder:
            for te in text_encoders:
                te.gradient_checkpointing_enable()
    return Models(pipe, family, denoiser, vae, text_encoders, parts.tokenizers, objective, prediction_type,
                  weight_dtype, text_options=text_options(family, t_cfg.clip_skip, text_encoders))


def _place_denoiser(denoiser: nn.Module, device: torch.device, compute: torch.dtype, base_dtype: str) -> None:
    """Move the frozen denoiser to the device with its weights stored as `[model] base_dtype` says.

    `auto`, `fp32`, or the compute dtype itself: the whole model in that dtype (fp32 under
    mixed precision: autocast computes in the narrower one). A narrower storage than the
    compute dtype: Linear (and for bf16/fp16 Conv2d) weights are stored, on the CPU and one
    layer at a time, before the model moves, and widened per layer in the forward
    (lokr_diffusion.storage)."""
    from ..storage import BASE_DTYPES, store_frozen_weights, stored_bytes

    base = BASE_DTYPES.get(base_dtype, compute)
    if base in (compute, torch.float32):
        _place(denoiser, device, base)
        return
    if next(denoiser.parameters()).dtype != compute:
        denoiser.to(dtype=compute)
    layers = store_frozen_weights(denoiser, base)
    denoiser.to(device)
    logger.info("denoiser: %d layers stored in %s, %.2f GiB in all", layers, base_dtype, stored_bytes(denoiser) / 2**30)


def _place(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move a frozen model, casting only when its dtype differs: Diffusers warns about every
    cast of a model with float32-only modules, even to the dtype it already has."""
    if next(model.parameters()).dtype == dtype:
        model.to(device)
    else:
        model.to(device, dtype=dtype)


# -- 4. caches, now that the tokenizers and the VAE exist (and the trigger word's new tokens) --------

def fill_caches(run: Run, dataset, models: Models) -> tuple[Any, Any]:
    """Latents (and the trigger word's tokens); the text cache waits for the adapters.
    Returns the trigger embedding (or None) and the latent encoder."""
    from ..data import VaeLatentEncoder
    from ..embeddings import TriggerEmbedding

    cfg, accelerator = run.cfg, run.accelerator
    embedding = None
    if cfg.network.embedding_trigger and not models.family.trigger_embeddings:
        raise ConfigError(f"network.embedding_trigger: not available for {models.family.title} (trigger embeddings "
                          "are trained for CLIP text encoders only); remove it")
    if cfg.network.embedding_trigger:
        embedding = TriggerEmbedding(cfg.network.embedding_trigger, models.tokenizers, models.text_encoders,
                                     cfg.network.embedding_vectors).to(accelerator.device)
    encoder = VaeLatentEncoder(models.vae)
    for data in (dataset, run.validation) if run.validation is not None else (dataset,):
        data.set_text(models.tokenizers, embedding.expand if embedding is not None else None)
        if data.uses_latent_cache:
            with accelerator.main_process_first():  # the main process encodes, the others read its cache
                data.cache_latents(encoder, encoder.identity)
    return embedding, encoder


def cache_text(run: Run, dataset, models: Models, model: "TrainingModel") -> bool:
    """Encode every caption once when the text side does not train; True when cached."""
    from ..data import module_identity
    from ..text import tokenize

    if model.train_text_encoder or not all(c.static_captions for c in dataset.configs):
        return False

    def encode_captions(captions: list[str]) -> dict[str, torch.Tensor]:
        with torch.no_grad(), run.accelerator.autocast():
            embeds = model.encode_text(tokenize(models.tokenizers, captions))
        return {k: v.float().cpu() for k, v in embeds.items()}

    # big sequence embeddings (T5: 512 x 4096 per caption) go to disk rather than memory
    encoder_id = "|".join(module_identity(t) for t in models.text_encoders)
    encoder_id += "".join(f"|{k}={v}" for k, v in sorted(models.text_options.items()))  # clip_skip: other embeddings
    for data in (dataset, run.validation) if run.validation is not None else (dataset,):
        data.cache_text_embeddings(encode_captions, encoder_id, to_disk=models.family.text_cache_on_disk)
    return True


# -- 5. adapters, optimizer, data loader, resume --------------------------------------------------

@dataclass
class Parts:
    """What the loop trains and steps, and the state that a checkpoint restores."""

    network: Any
    model: Any  # TrainingModel, wrapped by accelerator.prepare
    embedding: Any
    optimizer: Any
    lr_scheduler: Any
    loader: Any
    encoder: Any
    ema: Any
    progress: Progress
    states: Any
    max_steps: int
    num_epochs: int
    steps_per_epoch: int


def attach_adapters(run: Run, dataset, models: Models, embedding, encoder) -> Parts:
    from diffusers.training_utils import EMAModel

    from ..data import make_loader
    from ..loading import init_from_file
    from ..network import chosen_text_encoders, create_network
    from . import checkpoint
    from .model import TrainingModel
    from .optim import build_lr_scheduler, build_optimizer

    cfg, accelerator, t_cfg = run.cfg, run.accelerator, run.cfg.train
    denoiser = models.denoiser if cfg.network.train_unet else None
    encoders = chosen_text_encoders(models.family, models.text_encoders, cfg.network)
    network = create_network(cfg.network.adapter_config(), unet=denoiser, text_encoders=encoders,
                             family=models.family, prediction_type=models.prediction_type)
    if cfg.network.init_from:  # before resume, which restores a checkpoint over it
        run.report(str(init_from_file(network, cfg.network.init_from, denoiser, encoders)))
    network.to(accelerator.device, dtype=torch.float32)
    if t_cfg.compile:
        _compile(models.denoiser, t_cfg)
    model = TrainingModel(network, models.denoiser, models.text_encoders, models.family,
                          cfg.network.train_text_encoder, embedding, conditioning=_conditioning(t_cfg),
                          text=models.text_options)
    if cache_text(run, dataset, models, model) and all(c.cache_latents != "off" for c in dataset.configs):
        models.park()  # every text and image input is cached: free device memory for the denoiser
    optimizer = build_optimizer(t_cfg.optimizer, _param_groups(network, embedding, t_cfg), t_cfg.learning_rate,
                                t_cfg.weight_decay, t_cfg.optimizer_args)
    loader = make_loader(dataset, num_replicas=accelerator.num_processes, rank=accelerator.process_index,
                         num_workers=t_cfg.num_workers)
    steps_per_epoch = max(1, math.ceil(len(loader) / t_cfg.gradient_accumulation_steps))
    max_steps = t_cfg.max_steps or t_cfg.epochs * steps_per_epoch
    num_epochs = t_cfg.epochs or sys.maxsize  # with max_steps alone, epochs run until the steps are done
    lr_scheduler = build_lr_scheduler(t_cfg.lr_scheduler, optimizer,
                                      warmup_steps=t_cfg.lr_warmup_steps * accelerator.num_processes,
                                      total_steps=max_steps * accelerator.num_processes,
                                      num_cycles=t_cfg.lr_scheduler_num_cycles, power=t_cfg.lr_scheduler_power)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    ema = EMAModel(network.parameters(), decay=t_cfg.ema_decay) if t_cfg.ema_decay else None
    progress = Progress()
    if ema is not None:
        ema.to(accelerator.device)
    # resume (progress and EMA are saved as JSON/safetensors by checkpoint.TrainingState, never pickled)
    states = checkpoint.TrainingState(accelerator, run.output_dir, progress, ema, checkpoint.run_identity(
        cfg, network, [models.denoiser, *models.text_encoders], models.family, accelerator.num_processes))
    states.resume(t_cfg.resume, loader, report=print if run.main else (lambda _: None))
    return Parts(network, model, embedding, optimizer, lr_scheduler, loader, encoder, ema, progress, states,
                 max_steps, num_epochs, steps_per_epoch)


def _compile(denoiser: nn.Module, t_cfg) -> None:
    """Compile the denoiser in place, adapters attached (training.compilation). The first training
    step compiles the training graph, the first sample the inference one."""
    from .compilation import compile_in_place

    args = compile_in_place(denoiser, t_cfg.compile_backend, t_cfg.compile_mode)
    how = "" if t_cfg.compile_backend != "inductor" else f", mode {t_cfg.compile_mode}" + (
        ", layout optimisation off on the CPU" if "options" in args else "")
    logger.info("denoiser compiled (backend %s%s)", t_cfg.compile_backend, how)


def _conditioning(t_cfg) -> dict[str, Any]:
    """Per-run inputs of the denoiser beyond the batch (Flux.1-dev's guidance value)."""
    return {} if t_cfg.guidance is None else {"guidance": t_cfg.guidance}


def _param_groups(network, embedding, t_cfg) -> list[dict]:
    """Denoiser adapters, text-encoder adapters, trigger embedding: each group its learning rate and
    weight decay (a group without "weight_decay" takes the optimizer's, train.weight_decay)."""
    groups = []
    unet_params = [p for k, a in network.named_children() if network.components[k] == "unet" for p in a.parameters()]
    te_params = [p for k, a in network.named_children() if network.components[k] != "unet" for p in a.parameters()]
    if unet_params:
        groups.append({"params": unet_params, "lr": t_cfg.unet_lr or t_cfg.learning_rate,
                       **_decay(t_cfg.unet_weight_decay)})
    if te_params:
        groups.append({"params": te_params, "lr": t_cfg.text_encoder_lr or t_cfg.learning_rate,
                       **_decay(t_cfg.text_encoder_weight_decay)})
    if embedding is not None:  # no weight decay: it would pull the vectors to zero, not to the word's start
        groups.append({"params": list(embedding.parameters()), "weight_decay": 0.0,
                       "lr": t_cfg.embedding_learning_rate})
    return groups


def _decay(weight_decay: float | None) -> dict[str, float]:
    return {} if weight_decay is None else {"weight_decay": weight_decay}


def _option_facts(t_cfg) -> dict[str, Any]:
    """sd-scripts' metadata keys of the loss, noise and clip-skip options, written when an option is
    on (ss_clip_skip tells a UI to sample with the same clip skip); files of runs without them
    stay as they were."""
    facts: dict[str, Any] = {}
    if t_cfg.loss_type != "l2":
        facts.update(ss_loss_type=t_cfg.loss_type, ss_huber_c=t_cfg.huber_c, ss_huber_schedule=t_cfg.huber_schedule,
                     ss_huber_scale=t_cfg.huber_scale)
    if t_cfg.multires_noise_iterations:
        facts.update(ss_multires_noise_iterations=t_cfg.multires_noise_iterations,
                     ss_multires_noise_discount=t_cfg.multires_noise_discount)
    if t_cfg.ip_noise_gamma:
        facts.update(ss_ip_noise_gamma=t_cfg.ip_noise_gamma,
                     ss_ip_noise_gamma_random_strength=t_cfg.ip_noise_gamma_random_strength)
    if t_cfg.clip_skip != 1:
        facts["ss_clip_skip"] = t_cfg.clip_skip
    return facts


# -- 6. files: adapters, checkpoints, samples ------------------------------------------------------

class Files:
    """Everything the run writes, with the facts every adapter file records."""

    def __init__(self, run: Run, dataset, models: Models, parts: Parts) -> None:
        cfg, t_cfg = run.cfg, run.cfg.train
        self.run, self.models, self.parts = run, models, parts
        self.save_dtype = _SAVE_DTYPES[cfg.output.save_dtype]
        self.state_bytes = 4 * 4 * parts.network.num_parameters()  # weights, two optimizer moments, EMA (fp32)
        self.facts = {
            "ss_sd_model_name": cfg.model.pretrained_model,
            "ss_v_parameterization": str(models.prediction_type == "v_prediction"),
            "ss_learning_rate": t_cfg.learning_rate, "ss_unet_lr": t_cfg.unet_lr or t_cfg.learning_rate,
            "ss_text_encoder_lr": t_cfg.text_encoder_lr or t_cfg.learning_rate,
            "ss_batch_size_per_device": t_cfg.batch_size,
            "ss_gradient_accumulation_steps": t_cfg.gradient_accumulation_steps,
            "ss_lr_scheduler": t_cfg.lr_scheduler, "ss_optimizer": t_cfg.optimizer, "ss_seed": t_cfg.seed,
            "ss_mixed_precision": t_cfg.mixed_precision, "ss_min_snr_gamma": t_cfg.min_snr_gamma,
            "ss_noise_offset": t_cfg.noise_offset, "ss_num_train_images": len(dataset.samples),
            "ss_datasets": json.dumps(dataset.summary_dict() if hasattr(dataset, "summary_dict") else
                                      {"samples_per_epoch": len(dataset), "images": len(dataset.samples)}),
            "ss_training_started_at": str(time.time()), "ss_max_train_steps": parts.max_steps,
            **_option_facts(t_cfg)}
        self.journal = _journal(run, models, parts)

    def save_adapter(self, path: Path) -> Path:
        from ..embeddings import embedding_path

        parts, progress = self.parts, self.parts.progress
        facts = dict(self.facts, ss_steps=progress.step, ss_epoch=progress.epoch)
        network, ema = parts.network, parts.ema
        if ema is not None:
            ema.store(network.parameters())
            ema.copy_to(network.parameters())
        try:
            if parts.embedding is not None:
                parts.embedding.save(embedding_path(path))
            return network.save(path, dtype=self.save_dtype,
                                metadata=network.metadata(title=self.run.cfg.output.name, extra=facts))
        finally:
            if ema is not None:
                ema.restore(network.parameters())

    def save_checkpoint(self) -> None:
        from . import checkpoint

        run, step = self.run, self.parts.progress.step
        if run.main:
            self.save_adapter(checkpoint.adapter_path(run.output_dir, run.cfg.output.name, step))
        self.parts.states.save(step, self.state_bytes)
        if run.main:
            checkpoint.prune(run.output_dir, run.cfg.output.name, run.cfg.output.keep_last)

    def _prompt_encoder(self):
        """With [train] clip_skip, samples get prompt embeddings from the training model's own
        encode_text (the pipeline's clip_skip would count layers differently, and Diffusers' breaks
        on transformers 5's CLIP); None otherwise: the pipeline encodes the prompts itself."""
        from ..text import tokenize

        if not self.models.text_options:
            return None
        model = self.run.accelerator.unwrap_model(self.parts.model)
        expand = self.parts.embedding.expand if self.parts.embedding is not None else (lambda text: text)
        return lambda text: model.encode_text(tokenize(self.models.tokenizers, [expand(text)]))

    def sample(self) -> None:
        from .sampling import sample_grids

        run, s = self.run, self.run.cfg.sample
        accelerator, network, step = run.accelerator, self.parts.network, self.parts.progress.step
        if run.main and run.cfg.sample_prompts:
            network.eval()
            with self.models.whole_pipeline(accelerator.device) as pipe:
                grids = sample_grids(pipe, run.cfg.sample_prompts, run.output_dir / "samples", step,
                                     negative_prompt=s.negative_prompt, steps=s.steps,
                                     guidance_scale=s.guidance_scale, seed=s.seed, num_images=s.num_images,
                                     width=s.width, height=s.height, device=accelerator.device,
                                     autocast=accelerator.autocast, encode_prompt=self._prompt_encoder())
            network.train()
            tracker = _tensorboard(accelerator)
            if tracker is not None:
                for i, (prompt, _, array) in enumerate(grids):
                    tracker.writer.add_image(f"samples/{i:02d}", array, step, dataformats="HWC")
        accelerator.wait_for_everyone()


# -- 7. the loop -------------------------------------------------------------------------------------

def train_loop(run: Run, dataset, models: Models, parts: Parts) -> tuple[Files, float, int]:
    """Steps until max_steps or the last epoch; returns the writer, the start time and step."""
    from tqdm.auto import tqdm

    from . import checkpoint

    cfg, accelerator, t_cfg = run.cfg, run.accelerator, run.cfg.train
    _announce(run, models, parts)  # starts the trackers, which Files' journal writes to
    files = Files(run, dataset, models, parts)
    model, network, loader, optimizer, progress = parts.model, parts.network, parts.loader, parts.optimizer, parts.progress
    stop = StopRequested()
    stop.install()
    bar = tqdm(total=parts.max_steps, initial=progress.step, disable=not run.main, desc="training", dynamic_ncols=True)
    start, start_step = time.perf_counter(), progress.step
    model.train()
    while progress.step < parts.max_steps and progress.epoch < parts.num_epochs:
        loader.set_epoch(progress.epoch)  # a just-restored epoch keeps its position
        for batch in loader:
            with accelerator.accumulate(model):
                with torch.no_grad():
                    latents = batch["latents"] if "latents" in batch else parts.encoder(batch["pixel_values"])
                    latents = latents.to(accelerator.device, dtype=torch.float32)
                weights = None
                if t_cfg.prior_loss_weight != 1.0:
                    weights = torch.where(batch["is_reg"], t_cfg.prior_loss_weight, 1.0)
                mask = batch["mask"].to(accelerator.device) if "mask" in batch else None
                loss = models.objective.loss(latents, lambda noisy, timesteps: model(noisy, timesteps, batch),
                                             sample_weights=weights, mask=mask)
                finite = accelerator.reduce(torch.isfinite(loss.detach()).float().reshape(1), "min").item() > 0
                if not finite:
                    optimizer.zero_grad(set_to_none=True)
                    _nonfinite(progress, t_cfg.max_nonfinite_steps, "loss", run.main)
                    continue
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(network.parameters(), t_cfg.max_grad_norm or float("inf"))
                    if not torch.isfinite(torch.as_tensor(grad_norm)) and t_cfg.mixed_precision != "fp16":
                        optimizer.zero_grad(set_to_none=True)
                        _nonfinite(progress, t_cfg.max_nonfinite_steps, "gradient", run.main)
                        continue
                optimizer.step()
                parts.lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            progress.step += 1
            progress.nonfinite_in_a_row = 0
            progress.data = loader.state_dict()
            if parts.ema is not None:
                parts.ema.step(network.parameters())
            loss_value = accelerator.reduce(loss.detach().reshape(1), "mean").item()
            lr = parts.lr_scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            files.journal.step(progress.step, loss_value, lr, grad_norm)
            if cfg.output.save_every_steps and progress.step % cfg.output.save_every_steps == 0 \
                    and progress.step < parts.max_steps:
                files.save_checkpoint()
            if cfg.sample.every_steps and progress.step % cfg.sample.every_steps == 0:
                files.sample()
            if _stop_everywhere(accelerator, stop):
                files.save_checkpoint()
                raise TrainingStopped(
                    f"stopped by signal {stop.signal} at step {progress.step}; checkpoint saved in "
                    f"{checkpoint.state_dir(run.output_dir, progress.step)}. Resume with: "
                    f"{_resume_command(run.config_path, run.output_dir)}")
            if progress.step >= parts.max_steps:
                break
        else:
            progress.epoch += 1
            progress.data = loader.state_dict() if progress.step < parts.max_steps else progress.data
            if cfg.output.save_every_epochs and progress.epoch % cfg.output.save_every_epochs == 0 \
                    and progress.step < parts.max_steps:
                files.save_checkpoint()
            continue
        break
    bar.close()
    return files, start, start_step


def _announce(run: Run, models: Models, parts: Parts) -> None:
    from ..fileformat import atomic_write_bytes

    cfg, network, embedding = run.cfg, parts.network, parts.embedding
    trigger_note = ""
    if embedding is not None:
        trigger_note = f" + trigger embedding {embedding.word!r} ({embedding.num_vectors} vectors per text encoder)"
    if run.main:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        resolved = json.dumps(cfg.to_dict(), indent=2, default=str)
        atomic_write_bytes(run.output_dir / "config.json", resolved.encode())
        print(f"config:\n{resolved}")
        print(f"family {models.family.variant(models.prediction_type)}, {models.objective.describe()}, "
              f"{len(network.module_keys())} modules, "
              f"{network.num_parameters():,} trainable parameters{trigger_note}, {parts.max_steps} steps "
              f"({parts.steps_per_epoch} per epoch, {run.accelerator.num_processes} process(es))")
    # init_trackers runs on the main process only; the CSV log is always among the trackers
    run.accelerator.init_trackers("lokr-diffusion", config={k: v for k, v in _flat(cfg.to_dict()).items()},
                                  init_kwargs={"wandb": {"name": cfg.output.name}})


# -- 8. the result -------------------------------------------------------------------------------------

def finish(run: Run, models: Models, parts: Parts, looped: tuple[Files, float, int]) -> Path:
    from . import checkpoint

    files, start, start_step = looped
    cfg, accelerator, progress, network = run.cfg, run.accelerator, parts.progress, parts.network
    final = checkpoint.adapter_path(run.output_dir, cfg.output.name)
    if run.main:
        files.save_adapter(final)
    parts.states.save(progress.step, files.state_bytes)
    if run.main:
        checkpoint.prune(run.output_dir, cfg.output.name, cfg.output.keep_last)
    if cfg.sample_prompts:
        files.sample()
    chart = files.journal.finish(progress.step, title=f"{cfg.output.name}: loss")
    agree = _ranks_agree(accelerator, network)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.num_processes > 1:
        # Freeing the DDP reducer tears the gloo process group down while its worker thread may
        # still need the GIL: a deadlock. Keep them alive; main() exits the process directly.
        _KEEP_UNTIL_EXIT.append((parts.model, accelerator))
    if run.main:
        elapsed = time.perf_counter() - start
        steps = progress.step - start_step
        peak, peak_label = peak_memory_gib(accelerator.device)
        print(f"done: {progress.step} steps ({steps / elapsed if elapsed > 0 else 0:.2f} steps/s this run), "
              f"peak memory {'unavailable' if peak is None else f'{peak:.2f} GiB'} ({peak_label}), "
              f"{network.num_parameters():,} trainable parameters, "
              f"{progress.nonfinite_total} non-finite steps skipped\n"
              f"adapter {'identical' if agree else 'DIFFERENT'} on all {accelerator.num_processes} process(es)\n"
              f"adapter: {final}" + (f"\nloss chart: {chart}" if chart is not None else ""))
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


def _journal(run: Run, models: Models, parts: Parts):
    """The run's logging and validation (see logs.Journal): created after the resume, so a
    resumed run's CSV log is cut back to the checkpoint's step."""
    from .logs import Journal
    from .validation import Validator

    cfg, validator = run.cfg, None
    if run.validation is not None:
        validator = Validator(run.accelerator, run.validation, cfg.validation.batch_size or cfg.train.batch_size,
                              models.objective, parts.model, parts.ema, parts.network, parts.encoder,
                              cfg.validation.timesteps, cfg.validation.seed)
    return Journal(run.accelerator, cfg, run.output_dir, validator, parts.progress.step, parts.max_steps)


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


def _resume_command(config_path: Path | None, output_dir: Path) -> str:
    from ..resources import BUNDLE_DIR

    if config_path is not None and BUNDLE_DIR in config_path.resolve().parents:
        # the installed package's quickstart: no train.py there, and the outputs are not where its config says
        return f"lokr-diffusion quickstart --output {output_dir} --set train.resume=latest"
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
    from ..quiet import silence_unrelated_warnings
    from .config import load_config
    from .lock import release_all

    silence_unrelated_warnings()
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

"""The training config: TOML in, a typed and validated `TrainConfig` out, before any model loads.

Each section is a dataclass; its fields are the TOML keys, declared with `schema.setting` (default,
rules and help text in one place; see lokr_diffusion.schema). Unknown keys are errors with a
did-you-mean suggestion, wrong types, non-finite numbers and impossible values are errors naming
the key, so a typo costs a second, not a model load. The `[data]` datasets are checked here too.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..data.config import DatasetConfig, dataset_configs_from_toml
from ..dtypes import TORCH_ALIASES_DOC, dtype_setting
from ..families import family_names
from ..errors import ConfigError
from ..network import AdapterConfig
from .loss import FLOW_LOSS_WEIGHTING, HUBER_SCHEDULES, LOSS_TYPES, TIMESTEP_SAMPLING
from .prompts import SamplePrompt, collect_prompts
from ..schema import Scope, build, help_text, read_toml_file, setting, tomllib

# Every name here is one diffusers.optimization.get_scheduler builds from the arguments the trainer
# passes (warmup and total steps); piecewise_constant needs step rules the config cannot give.
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor", "sgd")
# optimizer -> (module it imports, what to tell the user when it is missing)
OPTIONAL_OPTIMIZERS = {
    "adamw8bit": ("bitsandbytes", "pip install bitsandbytes"),
    "prodigy": ("prodigyopt", "pip install prodigyopt (and set learning_rate = 1.0, as Prodigy finds the step "
                              "size itself)"),
}
FAMILIES = ("auto", *family_names(trainable=True))  # every spelling of a family the trainer trains
MAX_SEED = 2**31 - 1  # each process adds its index before NumPy's seed(), which stops at 2**32 - 1
MAX_STEPS = 10**9  # far beyond any run; a larger number is a typo
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
# diffusers' polynomial schedule decays to lr_end = 1e-7 and refuses a peak rate not above it
POLYNOMIAL_LR_END = 1e-7


@dataclass
class ModelSection:
    pretrained_model: str = setting("", default_doc="(required)",
                                    help="hub id, Diffusers folder or single-file `.safetensors` checkpoint; "
                                         "a relative path is relative to the config file")
    family: str = setting("auto", choices=FAMILIES,
                          help="model family; decides file naming and conditioning (`auto`: from the model)")
    prediction_type: str = setting("auto", choices=("auto", "epsilon", "v_prediction"),
                                   help="what the UNet predicts (`auto`: from the model's scheduler config)")
    revision: str | None = setting(None, help="hub revision (branch, tag or commit)")
    variant: str | None = setting(None, help="hub weight variant, e.g. `fp16`")
    base_dtype: str = setting("auto", choices=("auto", "fp32", "bf16", "fp16", "fp8"), parse=dtype_setting(),
                              expect="string", default_doc="`auto` (the `mixed_precision` dtype)",
                              allowed_doc=f"`auto`, `fp32`, `bf16`, `fp16`, `fp8` {TORCH_ALIASES_DOC}",
                              help="dtype the frozen denoiser's weights are stored in (adapters stay fp32): "
                                   "`bf16`/`fp16` halve it, `fp8` stores each Linear weight as float8 with a "
                                   "per-row scale (a quarter), each widened per layer in the forward")

    def check(self) -> None:
        if not self.pretrained_model:
            raise ConfigError("model.pretrained_model: required (a hub id, a Diffusers folder or a .safetensors file)")


@dataclass
class NetworkSection(AdapterConfig):
    """The AdapterConfig fields plus which parts of the model get adapters."""

    train_unet: bool = setting(True, help="put adapters on the UNet")
    train_text_encoder: bool = setting(False, help="put adapters on the text encoder(s): all four attention "
                                                   "projections together")
    text_encoders: tuple[str, ...] | None = setting(
        None, default_doc="the family's: all (SD), `te1` (Flux: CLIP-L)",
        help="which text encoders get adapters when `train_text_encoder` is on, by file prefix (`te`, `te1`, "
             "`te2`...; Flux's `te2` is T5-XXL)")
    init_from: str | None = setting(
        None, help="start from this adapter file (ours or another tool's LoKr/LoHa/LoRA, relative to the config "
                   "file) instead of from zero: its modules must have the config's algo and shapes; modules it "
                   "lacks start fresh; `train.resume` still restores a checkpoint over it; see "
                   "[Per-module settings](#per-module-settings)")
    embedding_trigger: str | None = setting(
        None, help="also train the text-encoder input vectors of this made-up trigger word (pivotal tuning), "
                   "saved beside the adapter as `<name>_emb.safetensors`; see "
                   "[Trigger embeddings](#trigger-embeddings)")
    embedding_vectors: int | None = setting(
        None, ge=1, le=75, default_doc="the word's pieces",
        help="vectors per text encoder (CLIP reads at most 75 tokens); the default starts exactly where the base "
             "model reads the word")

    def adapter_config(self) -> AdapterConfig:
        """The adapter structure alone (what `create_network` and `plan` read)."""
        return AdapterConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(AdapterConfig)})

    def check(self) -> None:  # the per-field rules were checked in __post_init__
        if not (self.train_unet or self.train_text_encoder):
            raise ConfigError("network: train_unet and train_text_encoder are both false; nothing to train")
        if self.embedding_trigger is not None and (not self.embedding_trigger.strip()
                                                   or len(self.embedding_trigger.split()) != 1):
            raise ConfigError(f"network.embedding_trigger: expected one word, got {self.embedding_trigger!r}")


def _lr(default: float | None, help: str, **extra: Any) -> Any:
    return setting(default, gt=0, help=help, **extra)


@dataclass
class TrainSection:
    max_steps: int | None = setting(None, ge=1, le=MAX_STEPS, default_doc="(this or `epochs`)",
                                    help="optimizer steps to train")
    epochs: int | None = setting(None, ge=1, le=MAX_STEPS, default_doc="(this or `max_steps`)",
                                 help="whole epochs to train (with `max_steps` too: whichever ends first)")
    batch_size: int = setting(1, ge=1, le=4096, help="images per step and process")
    gradient_accumulation_steps: int = setting(1, ge=1, le=4096, help="batches per optimizer step")
    learning_rate: float = _lr(1e-4, "learning rate of the adapters")
    unet_lr: float | None = _lr(None, "learning rate of the UNet adapters", default_doc="`learning_rate`")
    text_encoder_lr: float | None = _lr(None, "learning rate of the text-encoder adapters",
                                        default_doc="`learning_rate`")
    embedding_lr: float | None = _lr(None, "learning rate of the trigger embedding (no weight decay)",
                                     default_doc="`text_encoder_lr`, else `learning_rate`")
    lr_scheduler: str = setting("constant", choices=LR_SCHEDULERS, help="learning-rate schedule (diffusers)")
    lr_warmup_steps: int = setting(0, ge=0, le=MAX_STEPS, help="linear warmup steps (not used by `constant`)")
    optimizer: str = setting("adamw", choices=OPTIMIZERS,
                             help="`adamw8bit` needs bitsandbytes, `prodigy` needs prodigyopt (use learning_rate "
                                  "= 1.0 with it)")
    weight_decay: float = setting(0.01, ge=0, help="decoupled weight decay of the adapters")
    max_grad_norm: float = setting(1.0, ge=0, help="gradient clipping (0 turns it off)")
    mixed_precision: str | None = setting(
        None, choices=("no", "fp16", "bf16"), parse=dtype_setting("no"), expect="string",
        default_doc="Accelerate's (`no` without `accelerate launch`)",
        allowed_doc="`no`, `fp16`, `bf16` (or `float32`/`fp32` for `no`, `float16`, `bfloat16`)",
        help="`fp16` needs a GPU (with a gradient scaler); adapter weights stay fp32. Unset, the run uses what "
             "Accelerate is configured with (`accelerate config`, `accelerate launch --mixed_precision`); set, "
             "the config wins and the run says so when Accelerate asked for another (fp16/bf16)")
    gradient_checkpointing: bool = setting(False, help="trade compute for memory")
    compile: bool = setting(False, help="torch.compile the denoiser once the adapters are attached (the first "
                                        "steps and the first sample compile; later ones run the compiled code)")
    compile_mode: str = setting("default", choices=COMPILE_MODES,
                                help="torch.compile mode (inductor): `reduce-overhead` adds CUDA graphs, "
                                     "`max-autotune` searches kernels longer")
    compile_backend: str = setting("inductor", choices=COMPILE_BACKENDS,
                                   help="torch.compile backend: `aot_eager` traces the same graphs without "
                                        "generating code (fast to compile, eager speed: for checking a setup)")
    seed: int = setting(42, ge=0, le=MAX_SEED, help="seeds data order, augmentation, noise and initial weights")
    min_snr_gamma: float | None = setting(None, gt=0, help="min-SNR loss weighting (5.0 is common)")
    noise_offset: float = setting(0.0, ge=0, le=1, help="offset noise (0.03-0.1 helps very dark / bright images)")
    zero_terminal_snr: bool = setting(False, help="rescale the noise schedule to zero terminal SNR (v-prediction "
                                                  "only); on automatically for a model whose scheduler config has "
                                                  "`rescale_betas_zero_snr`")
    min_timestep: int = setting(0, ge=0, lt=1000, help="lowest training timestep")
    max_timestep: int | None = setting(None, ge=1, le=1000, default_doc="the scheduler's (1000)",
                                       help="timesteps are drawn from [min_timestep, max_timestep)")
    timestep_sampling: str | None = setting(
        None, choices=TIMESTEP_SAMPLING, default_doc="`logit_normal` (flow models)",
        help="flow matching (Flux, SD3): density of the training positions between data and noise")
    logit_mean: float | None = setting(None, ge=-10, le=10, default_doc="0.0 (flow models)",
                                       help="flow matching: mean of `logit_normal`")
    logit_std: float | None = setting(None, gt=0, le=10, default_doc="1.0 (flow models)",
                                      help="flow matching: standard deviation of `logit_normal`")
    mode_scale: float | None = setting(None, ge=0, le=2, default_doc="1.29 (flow models)",
                                       help="flow matching: scale of the `mode` density")
    shift: float | None = setting(None, gt=0, le=100, default_doc="the model's scheduler",
                                  help="flow matching: fixed time shift; by default the scheduler's (Flux: "
                                       "resolution-dependent, SD3: 3.0)")
    loss_weighting: str | None = setting(None, choices=FLOW_LOSS_WEIGHTING, default_doc="`none` (flow models)",
                                         help="flow matching: per-sample loss weight (`sigma_sqrt`, `cosmap`)")
    guidance: float | None = setting(None, ge=0, le=100, default_doc="1.0 (Flux.1-dev)",
                                     help="guidance value fed to a guidance-distilled model (Flux.1-dev) while "
                                          "training")
    ema_decay: float | None = setting(None, gt=0, lt=1, help="keep an EMA of the adapter weights and save it")
    prior_loss_weight: float = setting(1.0, gt=0, le=1000,
                                       help="loss weight of regularisation images (`is_reg = true`) against the "
                                            "training images")
    masked_loss: bool = setting(False, help="weight the loss per pixel by each image's mask (`alpha_mask` or "
                                            "`conditioning_data_dir` under `[data]`); see docs/data.md")
    xformers: bool = setting(False, help="xformers attention on CUDA when installed; otherwise a warning")
    resume: str | None = setting(None, help="`\"latest\"` (newest checkpoint in the output folder) or a checkpoint "
                                            "folder, relative to the config file")
    max_nonfinite_steps: int = setting(10, ge=1, le=MAX_STEPS,
                                       help="skip steps with a non-finite loss or gradient; stop after this many "
                                            "in a row")
    num_workers: int = setting(0, ge=0, le=256, help="data loader worker processes")
    # -- options named as kohya sd-scripts names them: loss, noise, clip skip, optimizer and schedule arguments
    loss_type: str = setting("l2", choices=LOSS_TYPES,
                             help="per-element loss: `l2` (squared error), `l1`, `huber` (2c(sqrt(d^2+c^2)-c): squared "
                                  "near 0, linear beyond c) or `smooth_l1` (the same divided by c); per sample, "
                                  "then min-SNR and the other weights")
    huber_c: float = setting(0.1, gt=0, le=1,
                             help="`huber` / `smooth_l1`: threshold c at full noise (`huber_schedule` raises it "
                                  "towards 1 at low noise)")
    huber_schedule: str = setting("snr", choices=HUBER_SCHEDULES,
                                  help="`huber` / `smooth_l1`: `constant` c * scale, `exponential` scale * c^(t/T), "
                                       "`snr` (1 - c) / (1 + r)^2 + c with r the noise-to-signal ratio; flow models "
                                       "use t/T = s and r = s/(1-s) at path position s")
    huber_scale: float = setting(1.0, gt=0, le=100,
                                 help="`huber` / `smooth_l1`: multiplies the `constant` and `exponential` "
                                      "thresholds (not `snr`'s, as in sd-scripts)")
    multires_noise_iterations: int = setting(
        0, ge=0, le=64, default_doc="0 (off)",
        help="multires (pyramid) noise: add this many levels of low-resolution noise, each 2-4x coarser, then "
             "rescale to unit std (6-10 is common); after `noise_offset`. UNet models only")
    multires_noise_discount: float = setting(0.3, gt=0, le=1,
                                             help="multires noise: weight of level i is discount^i")
    ip_noise_gamma: float = setting(0.0, ge=0, le=1, default_doc="0 (off)",
                                    help="input perturbation: the denoiser's input is noised with noise + gamma * "
                                         "extra noise, the target keeps the plain noise (0.1 is common)")
    ip_noise_gamma_random_strength: bool = setting(False, help="input perturbation: draw gamma uniformly from "
                                                               "[0, ip_noise_gamma) each step")
    clip_skip: int = setting(1, ge=1, le=48,
                             help="prompt embedding from the n-th from last CLIP layer plus the final layer norm "
                                  "(1: the last layer; 2: A1111's and sd-scripts' clip skip 2), in training, the "
                                  "text cache and samples; SD 1.x / 2.x only (SD 2.x's encoder already ends one "
                                  "layer early)")
    optimizer_args: dict[str, Any] = setting(
        default_factory=dict, parse=lambda v, scope, key: _optimizer_args(v, scope, key), expect="table",
        default_doc="`{}`", allowed_doc="the optimizer's constructor arguments",
        help="extra optimizer constructor arguments, e.g. `{ betas = [0.9, 0.99], eps = 1e-8 }` or Prodigy's "
             "`{ d_coef = 2.0, decouple = true, use_bias_correction = true, safeguard_warmup = true }`; "
             "checked against the optimizer's signature (`lr` and `weight_decay` have their own keys)")
    unet_weight_decay: float | None = setting(None, ge=0, default_doc="`weight_decay`",
                                              help="weight decay of the denoiser adapters")
    text_encoder_weight_decay: float | None = setting(None, ge=0, default_doc="`weight_decay`",
                                                      help="weight decay of the text-encoder adapters")
    lr_scheduler_num_cycles: int = setting(1, ge=1, le=10_000,
                                           help="`cosine_with_restarts`: cosine cycles, the rate jumping back to "
                                                "its peak at each restart")
    lr_scheduler_power: float = setting(1.0, gt=0, le=100, help="`polynomial`: decay power (1: linear)")

    @property
    def embedding_learning_rate(self) -> float:
        return self.embedding_lr or self.text_encoder_lr or self.learning_rate

    def check(self) -> None:
        if self.max_steps is None and self.epochs is None:
            raise ConfigError("train: set max_steps or epochs")
        if self.max_timestep is not None and not self.min_timestep < self.max_timestep <= 1000:
            raise ConfigError(f"train.max_timestep: must be in ({self.min_timestep}, 1000], got {self.max_timestep}")
        if self.lr_scheduler == "polynomial" and not self.learning_rate > POLYNOMIAL_LR_END:
            raise ConfigError(f"train.lr_scheduler: 'polynomial' decays to {POLYNOMIAL_LR_END} and needs a larger "
                              f"train.learning_rate, got {self.learning_rate}")
        if self.compile and self.compile_mode != "default" and self.compile_backend != "inductor":
            raise ConfigError(f"train.compile_mode = {self.compile_mode!r} is an inductor mode; with "
                              f"train.compile_backend = {self.compile_backend!r} leave it at 'default'")
        if self.compile and self.xformers:
            raise ConfigError("train.compile and train.xformers: choose one. torch.compile does not trace into "
                              "xformers' kernels; PyTorch's own attention (the default) is memory-efficient and "
                              "compiles")
        if self.optimizer in OPTIONAL_OPTIMIZERS:
            module, install = OPTIONAL_OPTIMIZERS[self.optimizer]
            if importlib.util.find_spec(module) is None:
                raise ConfigError(f"train.optimizer = {self.optimizer!r} needs {module}: {install}")
        self._check_kohya_options()

    def _check_kohya_options(self) -> None:
        """Schedule arguments the chosen schedule would ignore are refused; optimizer_args are checked
        against the optimizer's constructor (after the install check above)."""
        from .optim import check_optimizer_args

        if self.lr_scheduler_num_cycles != 1 and self.lr_scheduler != "cosine_with_restarts":
            raise ConfigError(f"train.lr_scheduler_num_cycles: only `cosine_with_restarts` has cycles, but "
                              f"train.lr_scheduler = {self.lr_scheduler!r}")
        if self.lr_scheduler_power != 1.0 and self.lr_scheduler != "polynomial":
            raise ConfigError(f"train.lr_scheduler_power: only `polynomial` has a power, but "
                              f"train.lr_scheduler = {self.lr_scheduler!r}")
        self.optimizer_args = check_optimizer_args(self.optimizer, self.optimizer_args)


def _optimizer_args(value: Any, scope: Scope, key: str) -> dict[str, Any]:
    """A TOML table of scalars and arrays of scalars (the optimizer's signature is checked later)."""
    if not isinstance(value, Mapping):
        raise scope.fail(key, f"expected a table, e.g. {{ betas = [0.9, 0.99] }}, got {value!r}")
    scalar = (bool, int, float, str)
    for name, v in value.items():
        if not (isinstance(v, scalar) or (isinstance(v, list) and all(isinstance(x, scalar) for x in v))):
            raise scope.fail(f"{key}.{name}", f"expected a number, string, boolean or array of them, got {v!r}")
        if isinstance(v, float) and not math.isfinite(v):
            raise scope.fail(f"{key}.{name}", f"must be a finite number, got {v}")
    return dict(value)


@dataclass
class OutputSection:
    dir: str = setting("output", help="folder of the adapter, checkpoints and samples, relative to the config file")
    name: str = setting("lokr", help="file name of the adapter (`<name>.safetensors`)")
    save_every_steps: int | None = setting(None, ge=1, le=MAX_STEPS,
                                           help="save an adapter and resumable state every N steps")
    save_every_epochs: int | None = setting(None, ge=1, le=MAX_STEPS, help="the same every N epochs")
    keep_last: int | None = setting(3, ge=1, help="checkpoints and step adapters kept")
    save_dtype: str = setting("fp16", choices=("fp32", "fp16", "bf16"), parse=dtype_setting(), expect="string",
                              allowed_doc=f"`fp32`, `fp16`, `bf16` {TORCH_ALIASES_DOC}",
                              help="dtype of the saved adapter (alpha is always float32)")

    def check(self) -> None:
        if not self.name or "/" in self.name or "\\" in self.name:
            raise ConfigError(f"output.name: must be a plain file name, got {self.name!r}")


def _multiple_of_8(v: int) -> bool:
    return v % 8 == 0


@dataclass
class SampleSection:
    prompts: list[str] = setting(default_factory=list,
                                 help="one PNG grid per prompt: `samples/stepNNNNNN-II-<prompt>.png`, also in "
                                      "TensorBoard; a prompt may end in kohya's per-prompt options "
                                      "`--n <negative> --w <width> --h <height> --s <steps> --l <cfg> --d <seed>`")
    prompt_file: str | None = setting(None, help="text file of more prompts, one per line with the same options "
                                                 "(`#` lines are comments), relative to the config file")
    negative_prompt: str = setting("", help="negative prompt of every sample")
    every_steps: int | None = setting(None, ge=1, le=MAX_STEPS, help="sample every N steps (and always at the end)")
    steps: int = setting(20, ge=1, le=1000, help="denoising steps per image")
    guidance_scale: float = setting(7.0, ge=0, le=100, help="classifier-free guidance scale")
    seed: int = setting(0, ge=0, le=2**63 - 1, help="images use seeds seed, seed+1, ... (torch generators)")
    num_images: int = setting(2, ge=1, le=64, help="images per prompt")
    width: int | None = setting(None, ge=8, le=8192, valid=_multiple_of_8, default_doc="model default",
                                problem="must be a positive multiple of 8", allowed_doc="multiple of 8, [8, 8192]",
                                help="sample width in pixels (Flux and SD3: a multiple of 16)")
    height: int | None = setting(None, ge=8, le=8192, valid=_multiple_of_8, default_doc="model default",
                                 problem="must be a positive multiple of 8", allowed_doc="multiple of 8, [8, 8192]",
                                 help="sample height in pixels (Flux and SD3: a multiple of 16)")


TRACKERS = ("tensorboard", "wandb")
# tracker -> (module it imports, what to tell the user when it is missing)
OPTIONAL_TRACKERS = {"wandb": ("wandb", "pip install 'lokr-diffusion[wandb]' (or pip install wandb)")}


def _trackers_ok(value: list[str]) -> bool:
    return len(set(value)) == len(value)  # the names are checked in LoggingSection.check, with hints


@dataclass
class LoggingSection:
    trackers: list[str] = setting(default_factory=lambda: ["tensorboard"], valid=_trackers_ok,
                                  default_doc='`["tensorboard"]`',
                                  problem="lists a tracker twice",
                                  allowed_doc=", ".join(f"`{t}`" for t in TRACKERS),
                                  help="where loss, smoothed loss, learning rate, gradient norm and validation loss "
                                       "go, through Accelerate (`wandb` needs the `wandb` extra); the CSV log "
                                       "`logs/<name>_loss.csv` is always written")
    tensorboard: bool = setting(True, help="`false` leaves TensorBoard out even when `trackers` lists it (older "
                                           "spelling)")
    log_every_steps: int = setting(1, ge=1, le=MAX_STEPS, help="log every N steps")
    smoothing: float = setting(0.9, ge=0, lt=1, help="weight of the past in the smoothed loss (an exponential "
                                                     "moving average of the logged losses, bias-corrected)")

    @property
    def active_trackers(self) -> list[str]:
        return [t for t in self.trackers if t != "tensorboard" or self.tensorboard]

    def check(self) -> None:
        for tracker in self.trackers:
            if tracker in ("csv", "jsonl"):
                raise ConfigError(f"logging.trackers: {tracker!r} is not a tracker here: the CSV log "
                                  "(logs/<name>_loss.csv) is always written; list only "
                                  f"{', '.join(TRACKERS)} (or nothing)")
            if tracker not in TRACKERS:
                close = difflib.get_close_matches(tracker, TRACKERS, n=1)
                raise ConfigError(f"logging.trackers: {tracker!r} is not one of {', '.join(TRACKERS)}"
                                  + (f" (did you mean {close[0]!r}?)" if close else ""))
        for tracker in self.active_trackers:
            if tracker in OPTIONAL_TRACKERS:
                module, install = OPTIONAL_TRACKERS[tracker]
                if importlib.util.find_spec(module) is None:
                    raise ConfigError(f"logging.trackers: {tracker!r} needs the {module} package, which is not "
                                      f"installed: {install}; or remove it from the list")


def _timesteps_ok(value: list[int]) -> bool:
    return bool(value) and all(0 <= t < 1000 for t in value)


@dataclass
class ValidationSection:
    data_dir: str | None = setting(None, help="folder of held-out images with captions, read like a training "
                                              "dataset (the first dataset's resolution, buckets, captions and "
                                              "cache settings, no augmentation); relative to the config file")
    split: float | None = setting(None, gt=0, lt=1, help="instead of `data_dir`: hold out this share of the "
                                                          "training images (chosen by `seed`) and validate on them")
    every_steps: int | None = setting(None, ge=1, le=MAX_STEPS, default_doc="only at the end",
                                      help="validate every N steps (and always at the end)")
    batch_size: int | None = setting(None, ge=1, le=4096, default_doc="`train.batch_size`",
                                     help="images per validation batch and process")
    timesteps: list[int] = setting(default_factory=lambda: [100, 300, 500, 700, 900], valid=_timesteps_ok,
                                   problem="expected a non-empty list of integers in [0, 1000)",
                                   allowed_doc="integers in [0, 1000)",
                                   help="each image is scored at each of these timesteps (flow models: noise level "
                                        "sigma = t / 1000) and the losses averaged")
    seed: int = setting(0, ge=0, le=MAX_SEED, help="fixes the noise of each image, and which images `split` "
                                                   "holds out")

    @property
    def enabled(self) -> bool:
        return self.data_dir is not None or self.split is not None

    def check(self) -> None:
        if self.data_dir is not None and self.split is not None:
            raise ConfigError("validation: set data_dir or split, not both")
        if self.data_dir is not None and not self.data_dir.strip():
            raise ConfigError("validation.data_dir: expected a folder, got ''")
        if not self.enabled and self.every_steps is not None:
            raise ConfigError("validation.every_steps is set but there are no validation images: set "
                              "validation.data_dir (a folder) or validation.split (a share of the training images)")


SECTIONS = {"model": ModelSection, "network": NetworkSection, "train": TrainSection, "output": OutputSection,
            "sample": SampleSection, "logging": LoggingSection, "validation": ValidationSection}


@dataclass
class TrainConfig:
    model: ModelSection
    network: NetworkSection
    train: TrainSection
    output: OutputSection
    sample: SampleSection
    logging: LoggingSection
    validation: ValidationSection
    data: dict[str, Any]
    base_dir: Path = Path(".")
    # `[sample] prompts` and `prompt_file`, parsed with their per-prompt options (training/prompts.py)
    sample_prompts: list[SamplePrompt] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["data"] = self.data
        return out

    @property
    def output_dir(self) -> Path:
        p = Path(self.output.dir)
        return p if p.is_absolute() else self.base_dir / p


def _section(name: str, cls: type, table: Any) -> Any:
    return build(cls, table, Scope(name, ConfigError))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value), the value read as TOML (bare words are strings)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    path = key.strip().split(".")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {part} is not a table")
        node[path[-1]] = value
    return raw


def _resolve_resume(resume: str | None, base_dir: Path) -> str | None:
    """A relative checkpoint folder is relative to the config file, like every other path;
    "latest" is a keyword, not a folder."""
    if resume is None or resume == "latest":
        return resume
    if not resume.strip():
        raise ConfigError("train.resume: expected \"latest\" or a checkpoint folder, got ''")
    path = Path(resume).expanduser()
    return str(path if path.is_absolute() else base_dir / path)


def _resolve_init_from(init_from: str | None, base_dir: Path) -> str | None:
    """The adapter file to start from, relative to the config file; refused early when it is no
    file, rather than after the models have loaded."""
    if init_from is None:
        return None
    path = Path(init_from).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if not path.is_file():
        raise ConfigError(f"network.init_from: {path}: no such file (expected an adapter .safetensors)")
    return str(path)


def config_from_dict(raw: Mapping[str, Any], base_dir: Path = Path(".")) -> TrainConfig:
    """Check a parsed config (all sections and the datasets) and build the `TrainConfig`.

    `base_dir` is the config file's folder: relative paths (datasets, output, resume) are
    resolved against it so a config works from any working directory.
    """
    unknown = set(raw) - set(SECTIONS) - {"data"}
    for key in sorted(unknown):
        hint = difflib.get_close_matches(key, list(SECTIONS) + ["data"], n=1)
        raise ConfigError(f"[{key}]: unknown section" + (f" (did you mean [{hint[0]}]?)" if hint else ""))
    sections = {name: _section(name, cls, raw.get(name, {})) for name, cls in SECTIONS.items()}
    sections["train"].resume = _resolve_resume(sections["train"].resume, base_dir)
    sections["network"].init_from = _resolve_init_from(sections["network"].init_from, base_dir)
    if sections["validation"].data_dir is not None:  # relative to the config file, like every other path
        val_dir = Path(sections["validation"].data_dir).expanduser()
        sections["validation"].data_dir = str(val_dir if val_dir.is_absolute() else base_dir / val_dir)
    if not isinstance(raw.get("data", {}), Mapping):
        raise ConfigError(f"[data] must be a table, got {type(raw['data']).__name__}")
    data = dict(raw.get("data", {}))
    if not data:
        raise ConfigError("[data]: required: add [[data.datasets]] tables with a `dir`")
    datasets = dataset_configs_from_toml(data, base_dir=base_dir)  # refuse bad datasets before anything runs
    if sections["train"].masked_loss and not any(d.mask_source for d in datasets):
        raise ConfigError("train.masked_loss: no dataset gives loss masks: set alpha_mask = true or "
                          "conditioning_data_dir (a folder of mask images) under [data] or in a [[data.datasets]] entry")
    sample = sections["sample"]
    prompt_file = None
    if sample.prompt_file is not None:
        prompt_file = Path(sample.prompt_file).expanduser()
        sample.prompt_file = str(prompt_file if prompt_file.is_absolute() else base_dir / prompt_file)
        prompt_file = Path(sample.prompt_file)
    cfg = TrainConfig(**sections, data=data, base_dir=base_dir,
                      sample_prompts=collect_prompts(sample.prompts, prompt_file))
    if cfg.sample.every_steps and not cfg.sample_prompts:
        raise ConfigError("sample.every_steps is set but sample.prompts is empty (and there is no "
                          "sample.prompt_file)")
    return cfg


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read, override and validate a TOML config file. Relative paths are relative to the file.

    A UTF-8 byte-order mark is accepted; a syntax error names the file and the line.
    """
    path = Path(path)
    raw = read_toml_file(path, "config file", ConfigError)
    raw = apply_overrides(raw, list(overrides))
    try:
        return config_from_dict(raw, base_dir=path.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


# -- documentation: the README reference and --help-config come from the fields' help texts -------

REFERENCE: list[tuple[str, type, str]] = [
    ("model", ModelSection, ""),
    ("network", NetworkSection, ""),
    ("data", DatasetConfig, "keys are defaults for every `[[data.datasets]]` entry, which may override them:"),
    ("train", TrainSection, ""),
    ("output", OutputSection, ""),
    ("sample", SampleSection, ""),
    ("logging", LoggingSection, ""),
    ("validation", ValidationSection, "held-out images scored by the training loss at fixed timesteps and noise "
                                      "(see [Validation and logs](#validation-and-logs)):"),
]


class _HelpConfig(argparse.Action):
    """`--help-config [SECTION]`: print the config keys (like --help, it exits at once)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        try:
            text = help_text(values or None)
        except KeyError as exc:
            parser.error(f"--help-config: {exc.args[0]}")
        print(text)
        parser.exit(0)


def add_help_config_argument(parser: argparse.ArgumentParser) -> None:
    """Add `--help-config [SECTION]` to a trainer command line."""
    parser.add_argument("--help-config", nargs="?", const="", metavar="SECTION", action=_HelpConfig,
                        help="list the config keys by section, or one section's keys with defaults, allowed "
                             "values and meanings, then exit")

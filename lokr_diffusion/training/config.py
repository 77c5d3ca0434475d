"""The training config: TOML in, a typed and validated `TrainConfig` out, before any model loads.

Each section is a dataclass; its fields are the TOML keys. Unknown keys are errors with a
did-you-mean suggestion, wrong types and impossible values are errors naming the key, so a
typo costs a second, not a model load.
"""
from __future__ import annotations

import dataclasses
import difflib
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import ConfigError
from ..network import AdapterConfig

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
                 "piecewise_constant")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor", "sgd")


@dataclass
class ModelSection:
    pretrained_model: str = ""
    family: str = "auto"  # auto, sd1, sd2, sd2-v, sdxl
    prediction_type: str = "auto"  # auto, epsilon, v_prediction
    revision: str | None = None
    variant: str | None = None

    def check(self) -> None:
        if not self.pretrained_model:
            raise ConfigError("model.pretrained_model: required (a hub id, a Diffusers folder or a .safetensors file)")
        _choice("model.family", self.family, ("auto", "sd1", "sd2", "sd2-v", "sdxl"))
        _choice("model.prediction_type", self.prediction_type, ("auto", "epsilon", "v_prediction"))


@dataclass
class NetworkSection(AdapterConfig):
    """The AdapterConfig fields plus which parts of the model get adapters."""

    train_unet: bool = True
    train_text_encoder: bool = False
    embedding_trigger: str | None = None  # train input vectors for this trigger word (pivotal tuning)
    embedding_vectors: int | None = None  # default: as many as the word's current pieces

    def adapter_config(self) -> AdapterConfig:
        return AdapterConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(AdapterConfig)})

    def check(self) -> None:  # the AdapterConfig fields were checked in __post_init__
        if not (self.train_unet or self.train_text_encoder):
            raise ConfigError("network: train_unet and train_text_encoder are both false; nothing to train")
        if self.embedding_trigger is not None and (not self.embedding_trigger.strip()
                                                   or len(self.embedding_trigger.split()) != 1):
            raise ConfigError(f"network.embedding_trigger: expected one word, got {self.embedding_trigger!r}")
        if self.embedding_vectors is not None and self.embedding_vectors < 1:
            raise ConfigError(f"network.embedding_vectors: must be at least 1, got {self.embedding_vectors}")


@dataclass
class TrainSection:
    max_steps: int | None = None
    epochs: int | None = None
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    unet_lr: float | None = None
    text_encoder_lr: float | None = None
    embedding_lr: float | None = None
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no, fp16, bf16
    gradient_checkpointing: bool = False
    seed: int = 42
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0
    zero_terminal_snr: bool = False
    min_timestep: int = 0
    max_timestep: int | None = None
    ema_decay: float | None = None
    prior_loss_weight: float = 1.0  # loss weight of regularisation (is_reg) images
    xformers: bool = False
    resume: str | None = None  # "latest" or a checkpoint folder
    max_nonfinite_steps: int = 10
    num_workers: int = 0

    @property
    def embedding_learning_rate(self) -> float:
        return self.embedding_lr or self.text_encoder_lr or self.learning_rate

    def check(self) -> None:
        if self.max_steps is None and self.epochs is None:
            raise ConfigError("train: set max_steps or epochs")
        for name in ("max_steps", "epochs", "batch_size", "gradient_accumulation_steps", "max_nonfinite_steps"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"train.{name}: must be at least 1, got {v}")
        for name in ("learning_rate", "unet_lr", "text_encoder_lr", "embedding_lr"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigError(f"train.{name}: must be positive, got {v}")
        for name in ("lr_warmup_steps", "min_timestep", "num_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}: must not be negative, got {getattr(self, name)}")
        if self.max_timestep is not None and not self.min_timestep < self.max_timestep <= 1000:
            raise ConfigError(f"train.max_timestep: must be in ({self.min_timestep}, 1000], got {self.max_timestep}")
        if not self.prior_loss_weight > 0:
            raise ConfigError(f"train.prior_loss_weight: must be positive, got {self.prior_loss_weight}")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ConfigError(f"train.min_snr_gamma: must be positive, got {self.min_snr_gamma}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay: must be in (0, 1), got {self.ema_decay}")
        if self.max_grad_norm < 0 or self.noise_offset < 0 or self.weight_decay < 0:
            raise ConfigError("train: max_grad_norm, noise_offset and weight_decay must not be negative")
        _choice("train.lr_scheduler", self.lr_scheduler, LR_SCHEDULERS)
        _choice("train.optimizer", self.optimizer, OPTIMIZERS)
        _choice("train.mixed_precision", self.mixed_precision, ("no", "fp16", "bf16"))


@dataclass
class OutputSection:
    dir: str = "output"
    name: str = "lokr"
    save_every_steps: int | None = None
    save_every_epochs: int | None = None
    keep_last: int | None = 3
    save_dtype: str = "fp16"  # fp32, fp16, bf16

    def check(self) -> None:
        for name in ("save_every_steps", "save_every_epochs", "keep_last"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"output.{name}: must be at least 1, got {v}")
        _choice("output.save_dtype", self.save_dtype, ("fp32", "fp16", "bf16"))
        if not self.name or "/" in self.name or "\\" in self.name:
            raise ConfigError(f"output.name: must be a plain file name, got {self.name!r}")


@dataclass
class SampleSection:
    prompts: list[str] = field(default_factory=list)
    negative_prompt: str = ""
    every_steps: int | None = None
    steps: int = 20
    guidance_scale: float = 7.0
    seed: int = 0
    num_images: int = 2
    width: int | None = None
    height: int | None = None

    def check(self) -> None:
        for name in ("every_steps", "steps", "num_images"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"sample.{name}: must be at least 1, got {v}")
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None and (v < 8 or v % 8):
                raise ConfigError(f"sample.{name}: must be a positive multiple of 8, got {v}")


@dataclass
class LoggingSection:
    tensorboard: bool = True
    log_every_steps: int = 1

    def check(self) -> None:
        if self.log_every_steps < 1:
            raise ConfigError(f"logging.log_every_steps: must be at least 1, got {self.log_every_steps}")


SECTIONS = {"model": ModelSection, "network": NetworkSection, "train": TrainSection, "output": OutputSection,
            "sample": SampleSection, "logging": LoggingSection}


@dataclass
class TrainConfig:
    model: ModelSection
    network: NetworkSection
    train: TrainSection
    output: OutputSection
    sample: SampleSection
    logging: LoggingSection
    data: dict[str, Any]
    base_dir: Path = Path(".")

    def to_dict(self) -> dict[str, Any]:
        out = {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}
        out["data"] = self.data
        return out

    @property
    def output_dir(self) -> Path:
        p = Path(self.output.dir)
        return p if p.is_absolute() else self.base_dir / p


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        hint = difflib.get_close_matches(str(value), allowed, n=1)
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}"
                          + (f" (did you mean {hint[0]!r}?)" if hint else ""))


def _type_ok(value: Any, hint: Any) -> bool:
    """Whether a TOML value fits a field's annotation (ints are accepted for floats)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin in (list, tuple):  # TOML arrays; tuple[str, ...] fields take them too
        item = typing.get_args(hint)[0]
        return isinstance(value, (list, tuple)) and all(_type_ok(v, item) for v in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def _section(name: str, cls: type, table: Any) -> Any:
    if not isinstance(table, Mapping):
        raise ConfigError(f"[{name}] must be a table, got {type(table).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in table.items():
        if key not in names:
            hint = difflib.get_close_matches(key, names, n=1)
            raise ConfigError(f"{name}.{key}: unknown key" + (f" (did you mean {hint[0]!r}?)" if hint else
                                                               f"; known keys: {', '.join(names)}"))
        if not _type_ok(value, hints[key]):
            raise ConfigError(f"{name}.{key}: expected {_type_name(hints[key])}, got {value!r}")
        values[key] = float(value) if hints[key] in (float, float | None) and isinstance(value, int) else value
    section = cls(**values)
    section.check()
    return section


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


def config_from_dict(raw: Mapping[str, Any], base_dir: Path = Path(".")) -> TrainConfig:
    unknown = set(raw) - set(SECTIONS) - {"data"}
    for key in sorted(unknown):
        hint = difflib.get_close_matches(key, list(SECTIONS) + ["data"], n=1)
        raise ConfigError(f"[{key}]: unknown section" + (f" (did you mean [{hint[0]}]?)" if hint else ""))
    sections = {name: _section(name, cls, raw.get(name, {})) for name, cls in SECTIONS.items()}
    data = dict(raw.get("data", {}))
    if not data:
        raise ConfigError("[data]: required: add [[data.datasets]] tables with a `dir`")
    cfg = TrainConfig(**sections, data=data, base_dir=base_dir)
    if cfg.sample.every_steps and not cfg.sample.prompts:
        raise ConfigError("sample.every_steps is set but sample.prompts is empty")
    return cfg


def load_config(path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    """Read, override and validate a TOML config file. Relative paths are relative to the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    raw = apply_overrides(raw, list(overrides))
    try:
        return config_from_dict(raw, base_dir=path.resolve().parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None

"""Typed dataset settings, read from the trainer's TOML `[data]` table.

The TOML shape is::

    [data]                      # keys here are defaults for every dataset
    resolution = 512
    caption_extension = ".txt"

    [[data.datasets]]           # one table per dataset; its keys override [data]
    dir = "train/images"
    repeats = 10

    [[data.datasets]]
    dir = "train/reg"
    is_reg = true

A `[data]` table without `datasets` but with `dir` or `metadata_file` is one dataset.
Validation happens here, before anything is scanned or loaded, so a typo in the config stops the
run with a message that names the key instead of failing an hour later.
"""
from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from ..errors import DatasetError

MissingCaption = Literal["class_token", "empty", "error"]
CacheMode = Literal["memory", "disk", "off"]

_MISSING_CAPTION_CHOICES = ("class_token", "empty", "error")
_CACHE_CHOICES = ("memory", "disk", "off")
_NAMED_COLOURS = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "grey": (127, 127, 127),
    "gray": (127, 127, 127),
}


@dataclass(frozen=True)
class DatasetConfig:
    """One dataset of a run: where its images are and how they become training samples.

    Defaults are the values used when neither the dataset entry nor `[data]` sets a key.
    `resolution` is (width, height); an int `n` in TOML means (n, n). With bucketing it is the
    target *area*; without, the exact size every image is cropped to.
    """

    dir: Path | None = None
    metadata_file: Path | None = None
    recursive: bool = False
    repeats: int = 1
    is_reg: bool = False
    class_token: str | None = None
    caption_extension: str = ".txt"
    caption_prefix: str = ""
    caption_suffix: str = ""
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout: float = 0.0
    tag_dropout: float = 0.0
    missing_caption: MissingCaption = "class_token"
    resolution: tuple[int, int] = (512, 512)
    enable_bucket: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_step: int = 64
    bucket_no_upscale: bool = False
    random_crop: bool = False
    flip: bool = False
    cache_latents: CacheMode = "off"
    cache_dir: Path | None = None
    alpha_background: tuple[int, int, int] = (255, 255, 255)
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        # Normalise what Python callers may pass loosely, then check combinations; TOML input
        # has already been type-checked by dataset_configs_from_toml.
        if self.dir is not None and not isinstance(self.dir, Path):
            object.__setattr__(self, "dir", Path(self.dir))
        if self.metadata_file is not None and not isinstance(self.metadata_file, Path):
            object.__setattr__(self, "metadata_file", Path(self.metadata_file))
        if self.cache_dir is not None and not isinstance(self.cache_dir, Path):
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        if isinstance(self.resolution, int):
            object.__setattr__(self, "resolution", (self.resolution, self.resolution))
        else:
            object.__setattr__(self, "resolution", tuple(int(v) for v in self.resolution))
        ext = self.caption_extension
        if ext and not ext.startswith("."):
            object.__setattr__(self, "caption_extension", "." + ext)
        if not self.name:
            object.__setattr__(self, "name", str(self.dir or self.metadata_file or "<unnamed>"))
        _check_values(self, self.name)

    @property
    def caches_latents(self) -> bool:
        return self.cache_latents != "off"

    @property
    def static_captions(self) -> bool:
        """Whether a sample's caption is the same every epoch (apart from whole-caption dropout),
        which is what makes text-encoder outputs cacheable."""
        return not self.shuffle_caption and self.tag_dropout == 0.0


_KEYS = tuple(f.name for f in fields(DatasetConfig) if f.name != "name")
_PATH_KEYS = ("dir", "metadata_file", "cache_dir")


def _check_values(cfg: DatasetConfig, where: str) -> None:
    def fail(key: str, msg: str) -> None:
        raise DatasetError(f"{where}: {key} {msg}")

    if cfg.dir is None and cfg.metadata_file is None:
        fail("dir", "is not set: each dataset needs `dir` (a folder of images) or `metadata_file` "
                    "(a metadata.jsonl)")
    if cfg.repeats < 1:
        fail("repeats", f"must be at least 1, got {cfg.repeats}")
    if cfg.keep_tokens < 0:
        fail("keep_tokens", f"must be 0 or more, got {cfg.keep_tokens}")
    for key in ("caption_dropout", "tag_dropout"):
        value = getattr(cfg, key)
        if not (0.0 <= value <= 1.0) or math.isnan(value):
            fail(key, f"must be a probability between 0 and 1, got {value}")
    if cfg.missing_caption not in _MISSING_CAPTION_CHOICES:
        fail("missing_caption", f"must be one of {', '.join(map(repr, _MISSING_CAPTION_CHOICES))}, "
                                f"got {cfg.missing_caption!r}")
    if cfg.cache_latents not in _CACHE_CHOICES:
        fail("cache_latents", f"must be one of {', '.join(map(repr, _CACHE_CHOICES))}, "
                              f"got {cfg.cache_latents!r}")
    if len(cfg.resolution) != 2 or min(cfg.resolution) < 8 or any(v % 8 for v in cfg.resolution):
        fail("resolution", f"must be a positive multiple of 8 (or [width, height] of them), "
                           f"got {list(cfg.resolution)}")
    if cfg.bucket_step < 8 or cfg.bucket_step % 8:
        fail("bucket_step", f"must be a positive multiple of 8 (the VAE's downscale), got {cfg.bucket_step}")
    for key in ("min_bucket_reso", "max_bucket_reso"):
        value = getattr(cfg, key)
        if value < cfg.bucket_step or value % cfg.bucket_step:
            fail(key, f"must be a positive multiple of bucket_step ({cfg.bucket_step}), got {value}")
    if cfg.min_bucket_reso > cfg.max_bucket_reso:
        fail("min_bucket_reso", f"({cfg.min_bucket_reso}) is larger than max_bucket_reso ({cfg.max_bucket_reso})")
    if cfg.enable_bucket and cfg.min_bucket_reso * cfg.min_bucket_reso > cfg.resolution[0] * cfg.resolution[1]:
        fail("min_bucket_reso", f"({cfg.min_bucket_reso}) squared is larger than the resolution's area "
                                f"{cfg.resolution[0]}x{cfg.resolution[1]}: no bucket would fit")
    if cfg.random_crop and cfg.caches_latents:
        fail("random_crop", "cannot be combined with cache_latents: the crop is baked into the cached "
                            "latents; set random_crop = false or cache_latents = \"off\"")
    if len(cfg.alpha_background) != 3 or any(not 0 <= c <= 255 for c in cfg.alpha_background):
        fail("alpha_background", f"must be three 0-255 values, got {list(cfg.alpha_background)}")


# --------------------------------------------------------------------------------------------
# TOML reading


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array",
            dict: "table"}.get(type(value), type(value).__name__)


def _expect(where: str, key: str, value: Any, expected: str) -> DatasetError:
    return DatasetError(f"{where}: {key} must be {expected}, got {value!r} ({_type_name(value)})")


def _convert(where: str, key: str, value: Any, base_dir: Path | None) -> Any:
    """Check one TOML value's type strictly (true is not 1, "10" is not 10) and convert it."""
    if key in ("recursive", "is_reg", "shuffle_caption", "enable_bucket", "bucket_no_upscale",
               "random_crop", "flip"):
        if not isinstance(value, bool):
            raise _expect(where, key, value, "true or false")
        return value
    if key in ("repeats", "keep_tokens", "min_bucket_reso", "max_bucket_reso", "bucket_step"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _expect(where, key, value, "an integer")
        return value
    if key in ("caption_dropout", "tag_dropout"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _expect(where, key, value, "a number between 0 and 1")
        return float(value)
    if key in _PATH_KEYS:
        if not isinstance(value, str) or not value:
            raise _expect(where, key, value, "a path (non-empty string)")
        path = Path(value).expanduser()
        if base_dir is not None and not path.is_absolute():
            path = base_dir / path
        return path
    if key == "resolution":
        if isinstance(value, int) and not isinstance(value, bool):
            return (value, value)
        if (isinstance(value, list) and len(value) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            return (value[0], value[1])
        raise _expect(where, key, value, "an integer or [width, height]")
    if key == "alpha_background":
        if isinstance(value, str):
            return _parse_colour(where, value)
        if (isinstance(value, list) and len(value) == 3
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            return tuple(value)
        raise _expect(where, key, value, "a colour name, \"#rrggbb\" or [r, g, b]")
    if key == "class_token":
        if not isinstance(value, str):
            raise _expect(where, key, value, "a string")
        return value or None
    # the remaining keys are plain strings
    if not isinstance(value, str):
        raise _expect(where, key, value, "a string")
    return value


def _parse_colour(where: str, text: str) -> tuple[int, int, int]:
    lowered = text.strip().lower()
    if lowered in _NAMED_COLOURS:
        return _NAMED_COLOURS[lowered]
    if len(lowered) == 7 and lowered.startswith("#"):
        try:
            return tuple(int(lowered[i:i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]
        except ValueError:
            pass
    raise DatasetError(f"{where}: alpha_background must be one of {', '.join(_NAMED_COLOURS)} "
                       f"or \"#rrggbb\", got {text!r}")


def _unknown_key_error(where: str, key: str, allowed: Iterable[str]) -> DatasetError:
    allowed = sorted(allowed)
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return DatasetError(f"{where}: unknown key {key!r}.{hint} Known keys: {', '.join(allowed)}")


def _read_entry(where: str, table: Mapping[str, Any], base_dir: Path | None,
                ignore: frozenset[str] = frozenset()) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key in ignore:
            continue
        if key not in _KEYS:
            raise _unknown_key_error(where, key, [*_KEYS, *ignore])
        values[key] = _convert(where, key, value, base_dir)
    return values


def dataset_configs_from_toml(data_table: Mapping[str, Any], *, base_dir: str | Path | None = None,
                              extra_keys: Iterable[str] = ()) -> list[DatasetConfig]:
    """Turn the TOML `[data]` table into one `DatasetConfig` per `[[data.datasets]]` entry.

    Keys directly under `[data]` are defaults every entry inherits. Relative paths (`dir`,
    `metadata_file`, `cache_dir`) are resolved against `base_dir` (pass the config file's folder)
    so a config works from any working directory. `extra_keys` names `[data]` keys that belong to
    the trainer (e.g. "batch_size") so they are not reported as unknown; they are ignored here.
    Raises DatasetError naming the key for unknown keys (with a suggestion) and wrong types.
    """
    if not isinstance(data_table, Mapping):
        raise DatasetError(f"[data] must be a table, got {_type_name(data_table)}")
    base = Path(base_dir) if base_dir is not None else None
    extra = frozenset(extra_keys)
    defaults = _read_entry("[data]", data_table, base, ignore=extra | {"datasets"})
    entries = data_table.get("datasets")
    if entries is None:
        if "dir" not in defaults and "metadata_file" not in defaults:
            raise DatasetError("[data]: no datasets: add [[data.datasets]] tables with a `dir`, "
                               "or set `dir` directly under [data]")
        entries = [{}]
    if not isinstance(entries, list) or not all(isinstance(e, Mapping) for e in entries):
        raise DatasetError(f"[data]: datasets must be an array of tables ([[data.datasets]]), "
                           f"got {_type_name(entries)}")
    if not entries:
        raise DatasetError("[data]: datasets is empty: add at least one [[data.datasets]] table")
    configs = []
    for i, entry in enumerate(entries):
        where = f"[[data.datasets]] #{i + 1}" if "datasets" in data_table else "[data]"
        values = {**defaults, **_read_entry(where, entry, base)}
        label = str(values.get("dir") or values.get("metadata_file") or "")
        configs.append(DatasetConfig(**values, name=f"{where} ({label})" if label else where))
    return configs

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

import math
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from ..errors import DatasetError
from ..schema import Scope, check_fields, check_value, keys_of, read_table, setting, spec_of, toml_type

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


MAX_REPEATS = 10_000  # times per epoch; more is a typo (use more epochs instead)
MAX_RESOLUTION = 8192  # pixels per side: beyond any Stable Diffusion model's training size


def _parse_path(value: Any, scope: Scope, key: str) -> Path:
    """A non-empty string, resolved against the config file's folder when relative."""
    if not isinstance(value, str) or not value:
        raise scope.fail(key, f"must be a path (non-empty string), got {value!r} ({toml_type(value)})")
    path = Path(value).expanduser()
    if scope.base_dir is not None and not path.is_absolute():
        path = scope.base_dir / path
    return path


def _parse_resolution(value: Any, scope: Scope, key: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        return (value[0], value[1])
    raise scope.fail(key, f"must be an integer or [width, height], got {value!r} ({toml_type(value)})")


def _parse_colour(value: Any, scope: Scope, key: str) -> tuple[int, int, int]:
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _NAMED_COLOURS:
            return _NAMED_COLOURS[lowered]
        if len(lowered) == 7 and lowered.startswith("#"):
            try:
                return tuple(int(lowered[i:i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]
            except ValueError:
                pass
        raise scope.fail(key, f"must be one of {', '.join(_NAMED_COLOURS)} or \"#rrggbb\", got {value!r}")
    if (isinstance(value, list) and len(value) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        return tuple(value)  # type: ignore[return-value]
    raise scope.fail(key, f"must be a colour name, \"#rrggbb\" or [r, g, b], got {value!r} ({toml_type(value)})")


def _parse_class_token(value: Any, scope: Scope, key: str) -> str | None:
    if not isinstance(value, str):
        raise scope.fail(key, f"must be a string, got {value!r} ({toml_type(value)})")
    return value or None


def _resolution_ok(value: tuple[int, ...]) -> bool:
    return len(value) == 2 and all(8 <= v <= MAX_RESOLUTION and v % 8 == 0 for v in value)


def _bucket_reso(default_doc: str, help: str) -> Any:
    return setting(None, ge=8, le=MAX_RESOLUTION, default_doc=default_doc,
                   help=help + " (a multiple of `bucket_step`)")


def derived_bucket_limits(resolution: tuple[int, int], step: int) -> tuple[int, int]:
    """(min, max) bucket side for a config that sets neither: half and twice the side of the
    training area, on the `step` grid, within [step, MAX_RESOLUTION].

    Why derived: fixed defaults fit one resolution only (256..1024 is 512's), so `resolution = 64`
    failed until the user found the bucket keys; half/twice is what the shipped SD 1.5 (256..1024)
    and SDXL / Flux.1 (512..2048) configs state explicitly.
    """
    side = math.isqrt(resolution[0] * resolution[1])
    top = MAX_RESOLUTION // step * step
    low = min(max(side // 2 // step * step, step), top)
    high = min(max(-(-2 * side // step) * step, low), top)
    return low, high


@dataclass(frozen=True)
class DatasetConfig:
    """One dataset of a run: where its images are and how they become training samples.

    Defaults are the values used when neither the dataset entry nor `[data]` sets a key.
    `resolution` is (width, height); an int `n` in TOML means (n, n). With bucketing it is the
    target *area*; without, the exact size every image is cropped to. Each field's rules and help
    text are in its `setting(...)` (see lokr_diffusion.schema); the README table is made from them.
    """

    dir: Path | None = setting(None, parse=_parse_path, expect="path", default_doc="(this or `metadata_file`)",
                               help="image folder, relative to the config file")
    metadata_file: Path | None = setting(None, parse=_parse_path, expect="path",
                                         help="a `metadata.jsonl` (`file_name` + `text`) instead of caption files")
    recursive: bool = setting(False, help="search subfolders")
    repeats: int = setting(1, ge=1, le=MAX_REPEATS,
                           help="times each image is seen per epoch (multiplies kohya `N_name` folders)")
    is_reg: bool = setting(False, help="regularisation images, balanced to the training images as kohya does")
    class_token: str | None = setting(None, parse=_parse_class_token, expect="string", default_doc="folder name",
                                      help="used for missing captions with `missing_caption = \"class_token\"`")
    caption_extension: str = setting(".txt", help="caption file extension; `.caption` files are also read")
    caption_prefix: str = setting("", help="added before every caption as written (e.g. a trigger word and `\", \"`)")
    caption_suffix: str = setting("", help="added after every caption as written")
    shuffle_caption: bool = setting(False, help="shuffle comma-separated tags")
    keep_tokens: int = setting(0, ge=0, le=1000, problem="must be 0 or more",
                               help="with `shuffle_caption`, keep the first N tags in place")
    caption_dropout: float = setting(0.0, ge=0, le=1, problem="must be a probability between 0 and 1",
                                     expect="a number between 0 and 1", help="drop the whole caption with this probability")
    tag_dropout: float = setting(0.0, ge=0, le=1, problem="must be a probability between 0 and 1",
                                 expect="a number between 0 and 1", help="drop single tags with this probability")
    missing_caption: MissingCaption = setting("class_token", choices=_MISSING_CAPTION_CHOICES,
                                              help="what an image without a caption gets")
    resolution: tuple[int, int] = setting((512, 512), parse=_parse_resolution, valid=_resolution_ok,
                                          expect="int or [w, h]", default_doc="`512`",
                                          allowed_doc=f"multiples of 8, [8, {MAX_RESOLUTION}]",
                                          problem="must be a positive multiple of 8 (or [width, height] of them), "
                                                  f"at most {MAX_RESOLUTION}",
                                          help="training area (bucketing) or crop size (without)")
    enable_bucket: bool = setting(True, help="aspect-ratio buckets")
    min_bucket_reso: int | None = _bucket_reso("half the `resolution` side", "smallest bucket side")
    max_bucket_reso: int | None = _bucket_reso("twice the `resolution` side", "largest bucket side")
    bucket_step: int = setting(64, ge=8, le=MAX_RESOLUTION, valid=lambda v: v % 8 == 0,
                               problem="must be a positive multiple of 8 (the VAE's downscale)",
                               allowed_doc=f"multiple of 8, [8, {MAX_RESOLUTION}]",
                               help="bucket sides are multiples of this")
    bucket_no_upscale: bool = setting(False, help="never enlarge small images")
    random_crop: bool = setting(False, help="random instead of centre crops (cannot combine with cached latents)")
    flip: bool = setting(False, help="random horizontal flips")
    cache_latents: CacheMode = setting("off", choices=_CACHE_CHOICES,
                                       help="`disk` caches survive runs and re-encode only changed images")
    cache_dir: Path | None = setting(None, parse=_parse_path, expect="path", default_doc="`<output>/cache`",
                                     help="where disk caches go")
    alpha_background: tuple[int, int, int] = setting(
        (255, 255, 255), parse=_parse_colour, expect="colour", default_doc='`"white"`',
        valid=lambda c: len(c) == 3 and all(0 <= v <= 255 for v in c), problem="must be three 0-255 values",
        allowed_doc="0-255 each",
        help='colour transparent images are composited on: a name (white, black, grey), `"#rrggbb"` or `[r, g, b]`')
    # loss masks (kohya's names); see data/masks.py
    alpha_mask: bool = setting(False, help="use each image's alpha channel as its loss mask (opaque trains, "
                                           "transparent is ignored); images without one train everywhere")
    conditioning_data_dir: Path | None = setting(
        None, parse=_parse_path, expect="path",
        help="folder of loss masks: for each image, a same-named image of the same size (white trains, black is "
             "ignored, grey in between; colour masks use their red channel)")
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
        if self.conditioning_data_dir is not None and not isinstance(self.conditioning_data_dir, Path):
            object.__setattr__(self, "conditioning_data_dir", Path(self.conditioning_data_dir))
        if isinstance(self.resolution, int):
            object.__setattr__(self, "resolution", (self.resolution, self.resolution))
        else:
            object.__setattr__(self, "resolution", tuple(int(v) for v in self.resolution))
        if (self.min_bucket_reso is None or self.max_bucket_reso is None) and self._derivable():
            low, high = derived_bucket_limits(self.resolution, self.bucket_step)
            # with one limit set, the other follows the resolution without crossing the one chosen
            if self.min_bucket_reso is None:
                low = low if self.max_bucket_reso is None else min(low, self.max_bucket_reso)
                object.__setattr__(self, "min_bucket_reso", low)
            if self.max_bucket_reso is None:
                object.__setattr__(self, "max_bucket_reso", max(high, self.min_bucket_reso))
        ext = self.caption_extension
        if ext and not ext.startswith("."):
            object.__setattr__(self, "caption_extension", "." + ext)
        if not self.name:
            object.__setattr__(self, "name", str(self.dir or self.metadata_file or "<unnamed>"))
        _check_values(self, self.name)

    def _derivable(self) -> bool:
        """Whether the values the bucket limits are derived from are usable; if not, the usual
        checks name the bad key instead of the derivation failing."""
        res, step = self.resolution, self.bucket_step
        return (isinstance(step, int) and not isinstance(step, bool) and step >= 8 and step % 8 == 0
                and len(res) == 2 and all(isinstance(v, int) and v > 0 for v in res))

    @property
    def caches_latents(self) -> bool:
        return self.cache_latents != "off"

    @property
    def mask_source(self) -> str | None:
        """"alpha", "folder" or None: where this dataset's loss masks come from."""
        if self.alpha_mask:
            return "alpha"
        return "folder" if self.conditioning_data_dir is not None else None

    @property
    def static_captions(self) -> bool:
        """Whether a sample's caption is the same every epoch (apart from whole-caption dropout),
        which is what makes text-encoder outputs cacheable."""
        return not self.shuffle_caption and self.tag_dropout == 0.0


_KEYS = tuple(keys_of(DatasetConfig))
_SPECS = {f.name: spec_of(f) for f in fields(DatasetConfig) if f.name in _KEYS}
_HINTS = typing.get_type_hints(DatasetConfig)
_PATH_KEYS = ("dir", "metadata_file", "cache_dir", "conditioning_data_dir")


def _check_values(cfg: DatasetConfig, where: str) -> None:
    """The per-field rules (from the settings), then the rules that involve several keys."""
    scope = Scope(where, DatasetError, dotted=False)
    check_fields(cfg, scope)

    def fail(key: str, msg: str) -> None:
        raise DatasetError(f"{where}: {key} {msg}")

    if cfg.dir is None and cfg.metadata_file is None:
        fail("dir", "is not set: each dataset needs `dir` (a folder of images) or `metadata_file` "
                    "(a metadata.jsonl)")
    if cfg.enable_bucket and cfg.bucket_step * cfg.bucket_step > cfg.resolution[0] * cfg.resolution[1]:
        fail("bucket_step", f"({cfg.bucket_step}) is larger than the resolution {cfg.resolution[0]}x"
                            f"{cfg.resolution[1]}: no bucket would fit; set bucket_step to a multiple of 8 that is "
                            "at most the resolution")
    for key in ("min_bucket_reso", "max_bucket_reso"):
        value = getattr(cfg, key)
        if value is None:
            continue  # only when resolution or bucket_step is unusable, which check_fields refused
        if value < cfg.bucket_step or value % cfg.bucket_step:
            fail(key, f"must be a positive multiple of bucket_step ({cfg.bucket_step}), got {value}")
    if cfg.min_bucket_reso > cfg.max_bucket_reso:
        fail("min_bucket_reso", f"({cfg.min_bucket_reso}) is larger than max_bucket_reso ({cfg.max_bucket_reso})")
    if cfg.enable_bucket and cfg.min_bucket_reso * cfg.min_bucket_reso > cfg.resolution[0] * cfg.resolution[1]:
        fail("min_bucket_reso", f"({cfg.min_bucket_reso}) squared is larger than the resolution's area "
                                f"{cfg.resolution[0]}x{cfg.resolution[1]}: no bucket would fit")
    if cfg.alpha_mask and cfg.conditioning_data_dir is not None:
        fail("alpha_mask", "and conditioning_data_dir both give loss masks: choose one (the alpha channel, or "
                           "the mask folder)")
    if cfg.random_crop and cfg.caches_latents:
        fail("random_crop", "cannot be combined with cache_latents: the crop is baked into the cached "
                            "latents; set random_crop = false or cache_latents = \"off\"")


# --------------------------------------------------------------------------------------------
# TOML reading


def _read_entry(where: str, table: Mapping[str, Any], base_dir: Path | None,
                ignore: frozenset[str] = frozenset()) -> dict[str, Any]:
    """One table's keys, converted and checked one by one, so a bad `[data]` default is named
    there rather than in every entry that inherits it."""
    scope = Scope(where, DatasetError, dotted=False, base_dir=base_dir)
    values = read_table(DatasetConfig, table, scope, ignore=ignore)
    for key, value in values.items():
        check_value(value, _SPECS[key], scope, key, _HINTS[key])
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
        raise DatasetError(f"[data] must be a table, got {toml_type(data_table)}")
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
                           f"got {toml_type(entries)}")
    if not entries:
        raise DatasetError("[data]: datasets is empty: add at least one [[data.datasets]] table")
    configs = []
    for i, entry in enumerate(entries):
        where = f"[[data.datasets]] #{i + 1}" if "datasets" in data_table else "[data]"
        values = {**defaults, **_read_entry(where, entry, base)}
        label = str(values.get("dir") or values.get("metadata_file") or "")
        configs.append(DatasetConfig(**values, name=f"{where} ({label})" if label else where))
    return configs

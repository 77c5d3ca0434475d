"""Per-module settings: `[[network.overrides]]` entries, the first whose `match` fits wins.

The LyCORIS counterparts are `name_algo_map` (settings by module name or pattern) and
`module_algo_map` (settings for every layer inside modules of a class). One list covers both:
`match` is a shell glob tried on the layer's module path, its file key, and the class name of
the layer and of every module that contains it (so `"FeedForward"`, `"*attn2*"`,
`"lora_te1_*"` and `"down_blocks.0.*"` all work). An override changes how a selected layer is
trained; it never selects one (that is `preset` / `include` / `exclude`), except that a k x k
conv of the preset trains when an override gives it a `dim` even without `conv_dim`, as in
LyCORIS. What an override leaves out comes from `[network]`.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from torch import nn

from .errors import ConfigError
from .schema import Scope, check_fields, read_table, setting, toml_type

_ALGOS = ("lokr", "loha", "lora")  # algos.ALGORITHMS, spelled here to keep this module import-light


@dataclass(frozen=True)
class ModuleOverride:
    """One `[[network.overrides]]` entry; None means "as `[network]` says"."""

    match: str = setting("", help="shell glob on the module path, file key or a containing module's class name")
    algo: str | None = setting(None, choices=_ALGOS, help="adapter algorithm of the matched modules")
    factor: int | None = setting(None, valid=lambda v: v == -1 or v >= 1, problem="expected -1 or a positive factor",
                                 help="LoKr factor")
    dim: int | None = setting(None, ge=1, problem="expected a positive integer",
                              help="rank of every matched module (k x k convs too)")
    alpha: float | None = setting(None, gt=0, help="alpha of the matched modules (default: their dim)")
    full_matrix: bool | None = setting(None, help="LoKr: never decompose w2")
    decompose_both: bool | None = setting(None, help="LoKr: also decompose w1")
    unbalanced_factorization: bool | None = setting(None, help="LoKr: larger output factor on w1")
    use_scalar: bool | None = setting(None, help="learnable scalar, both factors start non-zero")
    rs_lora: bool | None = setting(None, help="scale alpha / sqrt(dim)")
    weight_decompose: bool | None = setting(None, help="DoRA (LyCORIS `dora_wd`) on the matched modules")
    use_tucker: bool | None = setting(None, help="Tucker core on matched k x k convs with a low-rank factor")
    rank_dropout: float | None = setting(None, ge=0, lt=1, help="output-channel dropout")
    module_dropout: float | None = setting(None, ge=0, lt=1, help="whole-module dropout")

    def __post_init__(self) -> None:
        if not isinstance(self.match, str) or not self.match:
            raise ConfigError("network.overrides: every entry needs `match`, a non-empty glob or class name")

    def given(self) -> dict[str, Any]:
        """The settings this entry sets (without `match`)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "match" and getattr(self, f.name) is not None}

    def describe(self) -> str:
        return f"{self.match!r} -> " + ", ".join(f"{k} {v}" for k, v in self.given().items())


OVERRIDE_KEYS = tuple(f.name for f in dataclasses.fields(ModuleOverride))


def parse_overrides(value: Any, scope: Scope | None = None, key: str = "overrides") -> tuple[ModuleOverride, ...]:
    """An array of tables (TOML) or of dicts / ModuleOverride (Python) -> checked entries.

    Unknown keys are refused with a did-you-mean, naming the entry by its position."""
    scope = scope or Scope("network", ConfigError)
    if isinstance(value, (dict, ModuleOverride)):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise scope.fail(key, f"expected an array of tables ({{ match = \"...\", dim = ... }}), got {toml_type(value)}")
    out = []
    for i, entry in enumerate(value, 1):
        if isinstance(entry, ModuleOverride):
            out.append(entry)
            continue
        where = Scope(f"network.overrides #{i}", ConfigError, dotted=False)
        if not isinstance(entry, dict):
            raise where.error(f"{where.name}: expected a table like {{ match = \"*attn*\", factor = 16 }}, "
                              f"got {toml_type(entry)}")
        values = read_table(ModuleOverride, entry, where)
        if "match" not in values:
            raise where.error(f"{where.name}: `match` is required (a glob on module paths or keys, or a class name)")
        item = ModuleOverride(**values)
        check_fields(item, where)
        if len(values) == 1:
            raise where.error(f"{where.name}: {item.match!r} sets nothing; add some of "
                              f"{', '.join(k for k in OVERRIDE_KEYS if k != 'match')}")
        out.append(item)
    return tuple(out)


def containing_classes(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """module path -> class names of the module and of every module above it (nearest first)."""
    classes: dict[str, tuple[str, ...]] = {}
    for path, module in model.named_modules():
        parent = classes.get(path.rpartition(".")[0], ()) if path else ()
        classes[path] = (type(module).__name__, *parent)
    return classes


def matches(pattern: str, path: str, key: str, classes: Iterable[str]) -> bool:
    return (fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(key, pattern)
            or any(fnmatch.fnmatchcase(c, pattern) for c in classes))


def first_match(overrides: Sequence[ModuleOverride], path: str, key: str,
                classes: Iterable[str]) -> int | None:
    """Index of the first override whose `match` fits the layer, None when none does."""
    classes = tuple(classes)
    for i, o in enumerate(overrides):
        if matches(o.match, path, key, classes):
            return i
    return None


__all__ = ["ModuleOverride", "OVERRIDE_KEYS", "containing_classes", "first_match", "matches", "parse_overrides"]

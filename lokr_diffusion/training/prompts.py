"""Sample prompts with per-prompt settings, in kohya's prompt-line syntax.

A line is a prompt followed by options, each ` --<letter> <value>`::

    a cat on a sofa --n blurry, low quality --w 512 --h 768 --s 20 --l 7.5 --d 42

`--n` negative prompt, `--w`/`--h` width/height in pixels, `--s` denoising steps, `--l` guidance
(CFG) scale, `--d` seed; anything not given falls back to `[sample]`. Prompts come from
`[sample] prompts` and from `prompt_file` (one prompt per line; blank lines and lines starting
with `#` are skipped). Everything is parsed when the config is read, so an unknown option or a
bad value stops the run before a model loads, with the file and line (or list index) named.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import ConfigError

MAX_SIDE = 8192
MAX_SEED = 2**63 - 1
MAX_PROMPT_FILE_BYTES = 1 << 20  # a prompt file is a handful of lines; more is the wrong file

# kohya's option letters; an option starts at " --" followed by a letter
_OPTION_START = re.compile(r"\s+--(?=[A-Za-z])")


@dataclass(frozen=True)
class SamplePrompt:
    """One sample prompt and the settings it overrides (None: the `[sample]` value)."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    where: str = ""  # "prompts.txt:3" or "sample.prompts[0]": where messages point


def _int(low: int, high: int, multiple: int = 1) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError("is not a whole number") from None
        if not low <= value <= high or value % multiple:
            raise ValueError(f"must be {'a multiple of ' + str(multiple) + ' ' if multiple > 1 else ''}"
                             f"in [{low}, {high}]")
        return value
    return parse


def _float(low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError("is not a number") from None
        if not low <= value <= high:  # also refuses nan
            raise ValueError(f"must be in [{low:g}, {high:g}]")
        return value
    return parse


# letter -> (SamplePrompt field, what it is, parser)
OPTIONS: dict[str, tuple[str, str, Callable[[str], Any]]] = {
    "n": ("negative_prompt", "negative prompt", str),
    "w": ("width", "width", _int(8, MAX_SIDE, 8)),
    "h": ("height", "height", _int(8, MAX_SIDE, 8)),
    "s": ("steps", "steps", _int(1, 1000)),
    "l": ("guidance_scale", "guidance scale", _float(0, 100)),
    "d": ("seed", "seed", _int(0, MAX_SEED)),
}
_KNOWN = ", ".join(f"--{k} {what}" for k, (_, what, _) in OPTIONS.items())


def parse_prompt_line(line: str, where: str) -> SamplePrompt:
    """A prompt line -> SamplePrompt; ConfigError naming `where` and the line on an unknown
    option, a repeated one, a bad value or an empty prompt."""
    pieces = _OPTION_START.split(" " + line.strip())
    prompt = pieces[0].strip()
    if not prompt:
        raise ConfigError(f"{where}: no prompt before the options in {line.strip()!r}")
    values: dict[str, Any] = {}
    for piece in pieces[1:]:
        letter, _, raw = piece.partition(" ")
        key = letter.lower()
        if key not in OPTIONS:
            raise ConfigError(f"{where}: unknown option --{letter} in {line.strip()!r} (known: {_KNOWN})")
        name, what, parse = OPTIONS[key]
        if name in values:
            raise ConfigError(f"{where}: --{letter} is given twice in {line.strip()!r}")
        raw = raw.strip()
        if not raw and key != "n":
            raise ConfigError(f"{where}: --{letter} needs a value ({what}) in {line.strip()!r}")
        try:
            values[name] = parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{where}: --{letter} {raw!r} ({what}) {exc}, in {line.strip()!r}") from None
    return SamplePrompt(prompt, where=where, **values)


def read_prompt_file(path: Path) -> list[SamplePrompt]:
    """The prompts of a prompt file: one per line, `#` lines and blank lines skipped."""
    if not path.is_file():
        raise ConfigError(f"sample.prompt_file: {path} is not a file (expected one prompt per line)")
    if path.stat().st_size > MAX_PROMPT_FILE_BYTES:
        raise ConfigError(f"sample.prompt_file: {path} is larger than {MAX_PROMPT_FILE_BYTES} bytes; "
                          f"expected one prompt per line")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"sample.prompt_file: {path} is not UTF-8 text") from None
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip() and not line.lstrip().startswith("#"):
            prompts.append(parse_prompt_line(line, f"{path}:{number}"))
    if not prompts:
        raise ConfigError(f"sample.prompt_file: {path} holds no prompt (blank lines and # comments only)")
    return prompts


def collect_prompts(prompts: list[str], prompt_file: Path | None) -> list[SamplePrompt]:
    """`[sample] prompts` (each may use the option syntax too), then the prompt file's."""
    out = [parse_prompt_line(p, f"sample.prompts[{i}]") for i, p in enumerate(prompts)]
    if prompt_file is not None:
        out += read_prompt_file(prompt_file)
    return out


def check_sizes(prompts: list[SamplePrompt], width: int | None, height: int | None, multiple: int,
                model: str) -> None:
    """ConfigError when a prompt's width or height (or the `[sample]` default it falls back to) is
    not a multiple of what the model needs (the VAE's downscale, times 2 for 2x2 patches)."""
    for p in prompts:
        for what, value, default in (("width", p.width, width), ("height", p.height, height)):
            size = value if value is not None else default
            if size is not None and size % multiple:
                origin = f"--{what[0]} in {p.where}" if value is not None else f"sample.{what} (used by {p.where})"
                raise ConfigError(f"{origin}: {what} {size} is not a multiple of {multiple}, which {model} needs")

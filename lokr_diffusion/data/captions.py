"""Caption reading and per-sample caption augmentation.

Reading is strict (UTF-8 only) because a mis-decoded caption silently teaches the model garbage;
augmentation is a pure function of the caption, the settings and a caller-supplied RNG so the
same (seed, epoch, index) always gives the same caption.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .files import UnreadableFileError, read_regular_file

CAPTION_EXTENSIONS = (".txt", ".caption")

#: Caption files larger than this are refused (the image is skipped with a warning); real
#: captions, even long tag lists, are a few KiB.
MAX_CAPTION_BYTES = 64 << 10


class CaptionReadError(Exception):
    """A caption file exists but cannot be used; the message is the reason for the warning."""


def caption_candidates(image_path: Path, caption_extension: str) -> list[Path]:
    """Caption files that may belong to `image_path`, most preferred first.

    The configured extension wins; `.txt` and `.caption` are both understood because
    captioning tools disagree on which one to write.
    """
    exts = [caption_extension] + [e for e in CAPTION_EXTENSIONS if e != caption_extension]
    return [image_path.with_suffix(ext) for ext in exts]


def decode_caption_bytes(data: bytes) -> str:
    """Caption text from raw file bytes: UTF-8 (a BOM is allowed), first non-empty line.

    Only the first non-empty line is used, as kohya's trainers do, so tag files that end with
    blank lines or notes on later lines behave the same here.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bad = data[exc.start:exc.start + 1]
        raise CaptionReadError(f"caption is not valid UTF-8 (byte {exc.start}: {bad!r})") from None
    if "\x00" in text:
        raise CaptionReadError("caption contains NUL bytes (binary file?)")
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line
    return ""


def read_caption_file(path: Path, max_bytes: int = MAX_CAPTION_BYTES) -> str:
    """The caption in `path` (see `decode_caption_bytes`), or CaptionReadError.

    Only a regular file of at most `max_bytes` is read: a caption that is a named pipe would
    block the scan forever, and a huge one is not a caption (only its first line is used anyway).
    """
    try:
        data = read_regular_file(path, max_bytes=max_bytes)
    except UnreadableFileError as exc:
        reason = str(exc)
        if reason.startswith("cannot read: "):
            raise CaptionReadError(f"caption file cannot be read ({reason[len('cannot read: '):]})") from None
        raise CaptionReadError(f"caption file {reason}") from None
    return decode_caption_bytes(data)


def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


@dataclass(frozen=True)
class CaptionOptions:
    """The caption settings of one dataset (a subset of DatasetConfig, kept separate so the
    augmentation can be tested and reasoned about on its own)."""

    prefix: str = ""
    suffix: str = ""
    shuffle: bool = False
    keep_tokens: int = 0
    caption_dropout: float = 0.0
    tag_dropout: float = 0.0


def augment_caption(caption: str, options: CaptionOptions, rng: np.random.Generator) -> str:
    """The caption one sample is trained with this epoch.

    Order of operations:
      1. caption dropout: with probability `caption_dropout` the whole caption becomes "" (prefix
         and suffix included) so the model also learns the unconditional case;
      2. tags are the comma-separated parts; the first `keep_tokens` stay where they are and are
         never dropped (they usually hold the trigger word or subject);
      3. tag dropout removes each remaining tag with probability `tag_dropout`;
      4. shuffling permutes the remaining tags;
      5. prefix and suffix are added verbatim (write your own separator, e.g. "sks, "); they are
         never shuffled or dropped except by whole-caption dropout.
    Steps 2-4 only re-join the text (with ", ") when tag dropout or shuffling is on, so a natural
    language caption is passed through untouched otherwise.

    The RNG draws happen in a fixed order and always the same number of times for a given caption
    so one option does not change another option's randomness.
    """
    drop_caption = rng.random() < options.caption_dropout if options.caption_dropout > 0 else False
    body = caption
    if options.shuffle or options.tag_dropout > 0:
        tags = split_tags(caption)
        fixed, rest = tags[:options.keep_tokens], tags[options.keep_tokens:]
        if options.tag_dropout > 0 and rest:
            keep = rng.random(len(rest)) >= options.tag_dropout
            rest = [t for t, k in zip(rest, keep) if k]
        if options.shuffle and len(rest) > 1:
            rest = [rest[i] for i in rng.permutation(len(rest))]
        body = ", ".join(fixed + rest)
    if drop_caption:
        return ""
    return f"{options.prefix}{body}{options.suffix}"


def static_caption_variants(caption: str, options: CaptionOptions) -> list[str]:
    """Every caption a sample can get when captions do not vary per epoch (no shuffle, no tag
    dropout): the caption itself, plus "" when caption dropout can fire. Used to fill the
    text-encoder cache ahead of training."""
    full = f"{options.prefix}{caption}{options.suffix}"
    return [full, ""] if options.caption_dropout > 0 and full else [full]

"""Finding a dataset's images and their captions on disk.

Three layouts are understood, chosen per dataset:

* **metadata.jsonl** (Hugging Face *imagefolder*): one JSON object per line with `file_name`
  (relative to `dir`, or to the metadata file's folder when `dir` is not set) and `text`.
  Used when `metadata_file` is set or `dir/metadata.jsonl` exists.
* **kohya repeat folders**: immediate subfolders of `dir` named `<N>_<name>` (`10_mychar`) hold
  images repeated N times per epoch, with `<name>` as their class token.
* **plain folder**: images with same-named caption files (`cat.png` + `cat.txt` or
  `cat.caption`).

Repeat folders and plain images can be mixed in one `dir`; other subfolders are searched only
with `recursive = true`. Hidden files and folders (".cache", ".git") are never searched, so a
cache kept inside the dataset folder is not mistaken for data.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import DatasetError
from .captions import CaptionReadError, caption_candidates, read_caption_file
from .config import DatasetConfig
from .files import UnreadableFileError, read_regular_file
from .images import IMAGE_EXTENSIONS, is_image_file

REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
METADATA_NAME = "metadata.jsonl"

#: Most samples one image may contribute per epoch (folder repeats x the dataset's `repeats`).
#: Repeats are expanded into one sample each, so a folder named `100000000_x` would otherwise
#: allocate lists of that size per image; kohya's own examples use 1-100.
MAX_REPEATS = 10_000

#: metadata.jsonl files larger than this are refused: they are read whole, and 64 MiB already
#: holds several hundred thousand entries.
MAX_METADATA_BYTES = 64 << 20


@dataclass(frozen=True)
class SourceImage:
    """An image file and what its layout says about it; not yet opened."""

    path: Path
    caption: str | None  # None when there is no caption or it is empty
    class_token: str | None  # from the repeat folder's name, else the config's class_token
    repeats: int  # folder repeats x the config's repeats


@dataclass(frozen=True)
class SkippedFile:
    path: Path
    reason: str


@dataclass
class SourceScan:
    images: list[SourceImage]
    skipped: list[SkippedFile]
    looked_for: str  # what was searched, for the "no images found" message
    notes: list[str]  # things worth saying when nothing was found (ignored subfolders, ...)


def parse_repeat_folder(name: str) -> tuple[int, str] | None:
    """(repeats, class token) for a kohya folder name like "10_sks dog", else None."""
    match = REPEAT_FOLDER.match(name)
    if not match:
        return None
    digits = match.group(1).lstrip("0") or "0"
    # int() of thousands of digits raises (and is slow); anything this long is over MAX_REPEATS
    repeats = int(digits) if len(digits) <= 18 else 10**18
    return repeats, match.group(2).strip()


def check_repeats(cfg: DatasetConfig, folder: Path | None = None, folder_repeats: int = 1) -> None:
    """DatasetError unless folder repeats x the dataset's `repeats` is at most MAX_REPEATS."""
    total = folder_repeats * cfg.repeats
    if total <= MAX_REPEATS:
        return
    if folder is not None and folder_repeats > MAX_REPEATS:
        raise DatasetError(f"{cfg.name}: repeat folder {folder} asks for {folder_repeats} repeats, more than "
                           f"the limit of {MAX_REPEATS}: rename it with a smaller <N>_ prefix")
    if folder is not None:
        raise DatasetError(f"{cfg.name}: repeat folder {folder} ({folder_repeats} repeats) times repeats = "
                           f"{cfg.repeats} gives {total} repeats per image, more than the limit of "
                           f"{MAX_REPEATS}: lower one of them")
    raise DatasetError(f"{cfg.name}: repeats = {cfg.repeats} is more than the limit of {MAX_REPEATS}")


def _extensions_text() -> str:
    return "/".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)


def find_images(cfg: DatasetConfig) -> SourceScan:
    """The dataset's images in a stable (sorted) order, with captions read.

    Raises DatasetError when the folder or metadata file is missing; files that exist but cannot
    be used are returned in `skipped` so the caller can warn once per file and keep going.
    """
    check_repeats(cfg)
    metadata = cfg.metadata_file
    if metadata is None and cfg.dir is not None:
        candidate = cfg.dir / METADATA_NAME
        # any non-directory counts (a FIFO too, to be refused with a clear error, not silently
        # ignored in favour of the folder layout); os.stat does not block on a FIFO
        if candidate.exists() and not candidate.is_dir():
            metadata = candidate
    if metadata is not None:
        return _from_metadata(cfg, metadata)
    return _from_folder(cfg)


def _read_caption(image: Path, cfg: DatasetConfig, skipped: list[SkippedFile]) -> tuple[bool, str | None]:
    """(usable, caption) for an image from its caption file, if any."""
    for candidate in caption_candidates(image, cfg.caption_extension):
        if candidate.exists() or candidate.is_symlink():
            try:
                text = read_caption_file(candidate)
            except CaptionReadError as exc:
                skipped.append(SkippedFile(image, f"{exc} ({candidate.name})"))
                return False, None
            return True, text or None
    return True, None


def _walk(root: Path, recursive: bool) -> list[Path]:
    """Candidate image paths under `root`, sorted; hidden entries skipped."""
    found: list[Path] = []
    for current, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recursive else []
        found.extend(Path(current) / f for f in filenames
                     if not f.startswith(".") and is_image_file(Path(f)))
    return sorted(found)


def _from_folder(cfg: DatasetConfig) -> SourceScan:
    root = cfg.dir
    assert root is not None
    looked_for = (f"{_extensions_text()} images with {cfg.caption_extension}/.caption captions in "
                  f"{root.resolve()}{' and all its subfolders' if cfg.recursive else ''} "
                  f"(and in <N>_<name> repeat subfolders)")
    if not root.exists():
        raise DatasetError(f"{cfg.name}: folder {root.resolve()} does not exist (looked for {looked_for})")
    if not root.is_dir():
        raise DatasetError(f"{cfg.name}: {root.resolve()} is not a folder (dir must name a folder of images)")

    images: list[SourceImage] = []
    skipped: list[SkippedFile] = []
    notes: list[str] = []

    groups: list[tuple[Path, int, str | None, bool]] = []  # folder, repeats, class token, recurse
    for entry in sorted(root.iterdir()):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        parsed = parse_repeat_folder(entry.name)
        if parsed is not None:
            check_repeats(cfg, entry, parsed[0])
            groups.append((entry, parsed[0], parsed[1], cfg.recursive))
        elif not cfg.recursive:
            notes.append(f"subfolder {entry.name!r} was not searched: not a <N>_<name> repeat folder "
                         f"and recursive = false")
    repeat_dirs = {g[0] for g in groups}

    # Images directly in dir (and, when recursive, in its non-repeat subfolders).
    own = [p for p in _walk(root, cfg.recursive)
           if not any(parent in repeat_dirs for parent in p.parents)]
    plan = [(p, 1, cfg.class_token) for p in own]
    for folder, folder_repeats, token, recurse in groups:
        if folder_repeats == 0:
            notes.append(f"repeat folder {folder.name!r} has 0 repeats and was left out")
            continue
        plan.extend((p, folder_repeats, token) for p in _walk(folder, recurse))

    for path, folder_repeats, token in plan:
        ok, caption = _read_caption(path, cfg, skipped)
        if ok:
            images.append(SourceImage(path, caption, token, folder_repeats * cfg.repeats))
    return SourceScan(images, skipped, looked_for, notes)


def _from_metadata(cfg: DatasetConfig, metadata: Path) -> SourceScan:
    looked_for = f"entries with file_name and text in {metadata.resolve()}"
    if not metadata.exists():
        raise DatasetError(f"{cfg.name}: metadata file {metadata.resolve()} does not exist "
                           f"(expected a JSON-lines file with file_name and text on each line)")
    root = cfg.dir if cfg.dir is not None else metadata.parent
    if not root.is_dir():
        raise DatasetError(f"{cfg.name}: folder {root.resolve()} does not exist (file_name entries of "
                           f"{metadata} are relative to it)")
    try:
        lines = read_regular_file(metadata, max_bytes=MAX_METADATA_BYTES).decode("utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise DatasetError(f"{cfg.name}: {metadata} is not valid UTF-8") from None
    except UnreadableFileError as exc:
        raise DatasetError(f"{cfg.name}: metadata file {metadata}: {exc}") from None

    images: list[SourceImage] = []
    skipped: list[SkippedFile] = []
    seen: set[Path] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{metadata}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{cfg.name}: {where} is not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
            raise DatasetError(f"{cfg.name}: {where} needs a \"file_name\" string, got {line.strip()[:80]}")
        path = root / row["file_name"]
        if not is_image_file(path):
            skipped.append(SkippedFile(path, f"listed in {where} but not a "
                                             f"{_extensions_text()} file"))
            continue
        if path in seen:
            skipped.append(SkippedFile(path, f"listed again in {where} (first entry kept)"))
            continue
        seen.add(path)
        text = row.get("text", row.get("caption"))
        if text is not None and not isinstance(text, str):
            skipped.append(SkippedFile(path, f"text in {where} is not a string"))
            continue
        images.append(SourceImage(path, (text or "").strip() or None, cfg.class_token, cfg.repeats))
    return SourceScan(images, skipped, looked_for, [])

"""Reading files from a dataset folder without hanging or exhausting memory.

A dataset folder is user input: a named pipe (FIFO) named `cat.png` or `cat.txt` blocks a
plain `open()` forever, a symlink to /dev/zero never ends, and a multi-gigabyte "caption"
fills memory. Every read of a dataset file goes through `read_regular_file`, which refuses
anything that is not a regular file (after following symlinks) before reading a byte, and
stops at a size cap.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path


class UnreadableFileError(Exception):
    """A dataset file that must not (or cannot) be read; str(exc) is the reason, without the path,
    so callers can phrase it as one warning line (they know which file it was)."""


def file_kind(mode: int) -> str:
    """A human name for a non-regular file's type, for messages."""
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "a special file"


def _describe_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"


def read_regular_file(path: Path, *, max_bytes: int | None) -> bytes:
    """The bytes of `path`, which must be a regular file (symlinks followed) of at most
    `max_bytes` bytes (None: no cap); otherwise UnreadableFileError with the reason.

    The type is checked with os.stat before opening, and again on the opened descriptor (opened
    non-blocking, so a FIFO swapped in between cannot block), so no special file is ever read.
    Messages read after the file's name ("<path>: is a named pipe (FIFO), not a regular file").
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UnreadableFileError("cannot read: file not found (broken link?)") from None
    except OSError as exc:
        raise UnreadableFileError(f"cannot read: {exc.strerror or exc}") from None
    _check_regular(st.st_mode)
    limit = _too_big(st.st_size, max_bytes)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise UnreadableFileError("cannot read: file not found (removed while scanning?)") from None
    except PermissionError:
        raise UnreadableFileError("cannot read: permission denied") from None
    except OSError as exc:
        raise UnreadableFileError(f"cannot read: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        _check_regular(st.st_mode)
        limit = _too_big(st.st_size, max_bytes)
        with os.fdopen(fd, "rb", closefd=False) as f:
            # one byte past the cap tells a file that grew since the stat from one that did not
            data = f.read() if limit is None else f.read(limit + 1)
    except OSError as exc:
        raise UnreadableFileError(f"cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if limit is not None and len(data) > limit:
        raise UnreadableFileError(f"is larger than the {_describe_bytes(limit)} limit "
                                  f"(it grew while being read)")
    return data


def _check_regular(mode: int) -> None:
    if stat.S_ISDIR(mode):
        raise UnreadableFileError("cannot read: is a directory")
    if not stat.S_ISREG(mode):
        raise UnreadableFileError(f"is {file_kind(mode)}, not a regular file (not read)")


def _too_big(size: int, max_bytes: int | None) -> int | None:
    if max_bytes is not None and size > max_bytes:
        raise UnreadableFileError(f"is {size} bytes, more than the {_describe_bytes(max_bytes)} limit")
    return max_bytes

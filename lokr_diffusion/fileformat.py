"""Reading and writing adapter `.safetensors` files: bounds, validation, metadata, atomic writes.

Files come from strangers, so reading never unpickles, checks the header before allocating
anything, and turns every problem into an AdapterFileError naming the file and the key.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import stat
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from .errors import AdapterFileError, OutputError

if TYPE_CHECKING:
    from .families import Family

MAX_HEADER_BYTES = 100 * 1024 * 1024  # real adapter headers are well under 1 MB
MAX_METADATA_VALUE = 16 * 1024 * 1024
MAX_TENSORS = 200_000  # SDXL "full" with every tensor is ~10k
SPACE_MARGIN = 16 * 2**20
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}



def check_free_space(folder: str | os.PathLike, needed: int) -> None:
    """Refuse a write that cannot fit, before it starts, rather than leave a truncated file."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < needed + SPACE_MARGIN:
        raise OutputError(f"{folder}: {free / 2**20:.1f} MiB free, {needed / 2**20:.1f} MiB (+ {SPACE_MARGIN // 2**20} MiB "
                          "margin) needed; free some space and try again")


TEMP_TAG = "lokr"
_TEMP_FILE_RE = re.compile(r"\..+\.lokr-(\d+)\.tmp")


def temp_suffix(pid: int | None = None) -> str:
    """`.lokr-<pid>.tmp`: the end of every temporary name this project makes.

    A name only this project makes (not any `.*.tmp`) means cleaning up never touches a user's
    files, and the pid says whether the writer may still be running (see is_stale_temp).
    """
    return f".{TEMP_TAG}-{os.getpid() if pid is None else pid}.tmp"


def temp_owner(name: str, stem: str = "") -> int | None:
    """The pid in a temporary name of ours (`.<file>.<random>.lokr-<pid>.tmp`, or `<stem>.lokr-<pid>.tmp`
    when `stem` is given), None for any other name."""
    if stem:
        m = re.fullmatch(re.escape(stem) + r"\.lokr-(\d+)\.tmp", name)
    else:
        m = _TEMP_FILE_RE.fullmatch(name)
    return int(m[1]) if m else None


def is_stale_temp(pid: int) -> bool:
    """A temporary of ours whose writer is gone (or is this very process, which has not started
    writing it: a leftover of an earlier process with the same pid)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temp file in the same folder, fsync, rename: a crash leaves the old file.

    The temp file is named `.<name>.<random>.lokr-<pid>.tmp` (temp_suffix) so that only this
    project's leftovers are ever cleaned up."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        check_free_space(path.parent, len(data))
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=temp_suffix(), dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the file should be as readable as any other
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        if isinstance(exc, OutputError):
            raise
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}; the previous file, if any, is untouched") from exc
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
    return path


def tensor_hash(data: bytes) -> str:
    """sha256 of the bytes after the header: sd-scripts' `sshs_model_hash`."""
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n:]).hexdigest()


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Serialise, add the content hash to the metadata, and write atomically."""
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    data = _st_save(tensors, meta)
    meta["sshs_model_hash"] = tensor_hash(data)
    return atomic_write_bytes(path, _st_save(tensors, meta))


def require_regular_file(path: str | os.PathLike, what: str = "adapter file") -> os.stat_result:
    """Refuse anything but a regular file, from os.stat and before any open.

    Opening a named pipe blocks until a writer appears (forever, for a typo'd path in a
    script), and a folder or device fails with an OSError the user has to decode.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise AdapterFileError(f"{path}: no such file (expected a {what})") from None
    except OSError as exc:
        raise AdapterFileError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise AdapterFileError(f"{path}: is a folder, expected a {what}")
    if not stat.S_ISREG(st.st_mode):
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file")
        raise AdapterFileError(f"{path}: is {kind}, expected a {what} (regular files only; it was not opened)")
    return st


def read_header(path: str | os.PathLike) -> tuple[dict, dict[str, str]]:
    """(tensor entries, metadata) from a safetensors header, bounded and checked."""
    path = Path(path)
    require_regular_file(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterFileError(
            f"{path}: {path.suffix} files are Python pickles, which can run code when loaded; "
            "convert it to .safetensors, or load it explicitly with allow_pickle=True if you trust its source")
    size = path.stat().st_size
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise AdapterFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    with f:
        head = f.read(8)
        if len(head) < 8:
            raise AdapterFileError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or n + 8 > size:
            raise AdapterFileError(
                f"{path}: not a safetensors file (header length {n} does not fit the file size {size})")
        raw = f.read(n)
    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        if len(keys) != len(set(keys)):
            dup = sorted({k for k in keys if keys.count(k) > 1})
            raise AdapterFileError(f"{path}: the header lists {', '.join(dup[:5])} more than once")
        return dict(pairs)

    try:
        header = json.loads(raw, object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterFileError(f"{path}: not a safetensors file (header is not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise AdapterFileError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or any(not isinstance(v, str) or len(v) > MAX_METADATA_VALUE for v in metadata.values()):
        raise AdapterFileError(f"{path}: metadata must map names to strings of at most {MAX_METADATA_VALUE} characters")
    data_len = size - 8 - n
    if len(header) > MAX_TENSORS:
        raise AdapterFileError(f"{path}: {len(header)} tensors, more than the {MAX_TENSORS} an adapter can have")
    for key, entry in header.items():
        try:
            start, end = entry["data_offsets"]
            shape = entry["shape"]
            entry["dtype"]
        except (TypeError, KeyError, ValueError):
            raise AdapterFileError(f"{path}: tensor {key!r} has a malformed header entry") from None
        if not (0 <= start <= end <= data_len) or any(not isinstance(s, int) or s < 0 for s in shape):
            raise AdapterFileError(f"{path}: tensor {key!r} points outside the file (offsets {start}..{end}, data {data_len} bytes)")
        itemsize = _DTYPE_BYTES.get(entry["dtype"])
        if itemsize is None:
            raise AdapterFileError(f"{path}: tensor {key!r} has unknown dtype {entry['dtype']!r}")
        numel = 1
        for s in shape:
            numel *= s
        if numel * itemsize != end - start:
            raise AdapterFileError(f"{path}: tensor {key!r} of shape {shape} and dtype {entry['dtype']} needs "
                                   f"{numel * itemsize} bytes, the header gives it {end - start}")
    return header, metadata


def read_safetensors(path: str | os.PathLike, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an adapter file. Pickles only with allow_pickle (weights_only)."""
    path = Path(path)
    if allow_pickle and path.suffix.lower() in PICKLE_SUFFIXES:
        require_regular_file(path)
        obj = torch.load(path, map_location="cpu", weights_only=True)
        sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise AdapterFileError(f"{path}: expected a dict of tensors in the pickle")
        return dict(sd), {}
    read_header(path)
    try:
        tensors = _st_load(path.read_bytes())
    except OSError as exc:
        raise AdapterFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except Exception as exc:  # safetensors raises its own error types for corrupt data
        raise AdapterFileError(f"{path}: cannot read tensors: {exc}") from None
    _, metadata = read_header(path)
    return tensors, metadata


def training_metadata(family: Family | None, network_args: Mapping[str, object], dim: int, alpha: float,
                      title: str = "adapter", prediction_type: str | None = None,
                      extra: Mapping[str, object] | None = None) -> dict[str, str]:
    """The ss_* and modelspec.* keys sd-scripts writes and the UIs read, all as strings.

    ``family`` (and the base model's ``prediction_type``, e.g. ``"v_prediction"``) add the keys
    that say which base model the file is for; without a family none are guessed.
    """
    meta = {
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(alpha),
        "ss_network_args": json.dumps({k: str(v) for k, v in network_args.items()}),
        "ss_output_name": title,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.implementation": getattr(family, "implementation", "diffusers"),
        "modelspec.title": title,
        "modelspec.date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if family is not None:
        meta.update(family.file_metadata(prediction_type))
    for k, v in (extra or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v) if isinstance(v, (dict, list)) else str(v)
    return meta

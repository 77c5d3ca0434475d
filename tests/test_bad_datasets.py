"""Hostile dataset folders: special files, huge files, absurd repeats, pathological aspect ratios.

Each case builds a folder in tmp_path and runs the public entry (`dataset_configs_from_toml` +
`build_dataset`) in a worker thread with a timeout, so a regression that blocks on a FIFO fails
in seconds instead of hanging the suite. Every case also checks that building left the dataset
folder exactly as it was (nothing written, nothing consumed).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import stat
import threading
from pathlib import Path

import pytest
from PIL import Image

from lokr_diffusion.data import ImageRecord, build_dataset, dataset_configs_from_toml
from lokr_diffusion.data.captions import MAX_CAPTION_BYTES
from lokr_diffusion.data.dataset import MAX_SAMPLES_PER_EPOCH, ImageCaptionDataset
from lokr_diffusion.data.sources import MAX_METADATA_BYTES, MAX_REPEATS
from lokr_diffusion.errors import DatasetError

TIMEOUT_S = 30.0
DATA = "data"  # the dataset folder inside tmp_path

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs POSIX special files")


def _png(path: Path, size=(64, 64)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path


def _good(root: Path) -> Path:
    """One usable image with its caption, so the dataset is not empty when a bad file is skipped."""
    path = _png(root / "good.png")
    path.with_suffix(".txt").write_text("a good image")
    return path


def _snapshot(root: Path) -> dict[str, tuple]:
    """What the folder holds: every entry's type, link target, size and (regular files only)
    content hash; special files are lstat'ed, never opened."""
    out: dict[str, tuple] = {}
    for current, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(current) / name
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                out[str(path.relative_to(root))] = ("link", os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                out[str(path.relative_to(root))] = ("file", st.st_size, st.st_mtime_ns, digest)
            else:
                out[str(path.relative_to(root))] = (stat.S_IFMT(st.st_mode), st.st_mtime_ns)
    return out


def _build(tmp_path: Path, entry: dict | None = None, **defaults):
    """build_dataset from a TOML-like [data] table, in a thread that must finish in TIMEOUT_S.
    Returns the dataset or the DatasetError it raised."""
    table = {"resolution": 64, "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_step": 32, **defaults,
             "datasets": [{"dir": DATA, **(entry or {})}]}
    result: dict[str, object] = {}

    def work():
        try:
            configs = dataset_configs_from_toml(table, base_dir=tmp_path)
            result["value"] = build_dataset(configs, batch_size=1, report=None, scan_workers=1)
        except DatasetError as exc:
            result["value"] = exc
        except BaseException as exc:  # re-raised in the test thread
            result["crash"] = exc

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(TIMEOUT_S)
    if thread.is_alive():
        pytest.fail(f"building the dataset did not finish within {TIMEOUT_S:.0f} s (blocked on a special file?)")
    if "crash" in result:
        raise result["crash"]
    return result["value"]


# --------------------------------------------------------------------------------------------
# cases: each makes the bad thing in `root` and returns (file or folder named in the outcome,
# expected words); the image it names must not be a training record.


def image_fifo(root):
    os.mkfifo(root / "bad.png")
    return root / "bad.png", "is a named pipe (FIFO), not a regular file"


def image_link_to_dev_zero(root):
    (root / "bad.png").symlink_to("/dev/zero")
    return root / "bad.png", "is a character device, not a regular file"


def image_link_to_dev_null(root):
    (root / "bad.jpg").symlink_to("/dev/null")
    return root / "bad.jpg", "is a character device, not a regular file"


def image_socket(root):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(root / "bad.webp"))
    sock.close()  # the socket file stays
    return root / "bad.webp", "is a socket, not a regular file"


def image_link_to_fifo_outside(root):
    os.mkfifo(root.parent / "pipe")  # the link is followed: its target's type is what counts
    (root / "bad.png").symlink_to(root.parent / "pipe")
    return root / "bad.png", "is a named pipe (FIFO), not a regular file"


def image_fifo_in_repeat_folder(root):
    os.mkfifo((root / "3_thing").mkdir() or root / "3_thing" / "bad.png")
    return root / "3_thing" / "bad.png", "named pipe (FIFO)"


def caption_fifo(root):
    _png(root / "bad.png")
    os.mkfifo(root / "bad.txt")
    return root / "bad.png", "caption file is a named pipe (FIFO), not a regular file (not read) (bad.txt)"


def caption_dot_caption_fifo(root):
    _png(root / "bad.png")
    os.mkfifo(root / "bad.caption")
    return root / "bad.png", "caption file is a named pipe (FIFO), not a regular file (not read) (bad.caption)"


def caption_link_to_dev_zero(root):
    _png(root / "bad.png")
    (root / "bad.txt").symlink_to("/dev/zero")
    return root / "bad.png", "caption file is a character device, not a regular file (not read) (bad.txt)"


def caption_too_big(root):
    _png(root / "bad.png")
    (root / "bad.txt").write_bytes(b"tag, " * (MAX_CAPTION_BYTES // 5 + 1))
    size = (MAX_CAPTION_BYTES // 5 + 1) * 5
    return root / "bad.png", f"caption file is {size} bytes, more than the 64 KiB limit (bad.txt)"


def metadata_entry_is_fifo(root):
    os.mkfifo(root / "bad.png")
    lines = [{"file_name": "good.png", "text": "a good image"}, {"file_name": "bad.png", "text": "bad"}]
    (root / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root / "bad.png", "is a named pipe (FIFO), not a regular file"


def extreme_aspect_no_upscale(root):
    _png(root / "bad.png", (20000, 20))  # used to get a 19968x32 bucket past max_bucket_reso 128
    (root / "bad.txt").write_text("strip")
    return root / "bad.png", "aspect ratio too extreme: 20000x20 in its nearest allowed bucket 128x32"


def extreme_aspect_regular_buckets(root):
    _png(root / "bad.png", (6, 4000))
    return root / "bad.png", "aspect ratio too extreme: 6x4000 in its nearest allowed bucket 32x128"


SKIP_CASES = {
    "image_fifo": (image_fifo, {}),
    "image_link_to_dev_zero": (image_link_to_dev_zero, {}),
    "image_link_to_dev_null": (image_link_to_dev_null, {}),
    "image_socket": (image_socket, {}),
    "image_link_to_fifo_outside": (image_link_to_fifo_outside, {}),
    "image_fifo_in_repeat_folder": (image_fifo_in_repeat_folder, {}),
    "caption_fifo": (caption_fifo, {}),
    "caption_dot_caption_fifo": (caption_dot_caption_fifo, {}),
    "caption_link_to_dev_zero": (caption_link_to_dev_zero, {}),
    "caption_too_big": (caption_too_big, {}),
    "metadata_entry_is_fifo": (metadata_entry_is_fifo, {}),
    "extreme_aspect_no_upscale": (extreme_aspect_no_upscale, {"bucket_no_upscale": True}),
    "extreme_aspect_regular_buckets": (extreme_aspect_regular_buckets, {}),
}


@pytest.mark.parametrize("case", list(SKIP_CASES))
def test_bad_file_is_skipped_with_a_warning(tmp_path, caplog, case):
    make, entry = SKIP_CASES[case]
    root = tmp_path / DATA
    good = _good(root)
    named, words = make(root)
    before = _snapshot(root)
    with caplog.at_level(logging.WARNING, logger="lokr_diffusion.data"):
        ds = _build(tmp_path, entry)
    assert not isinstance(ds, Exception), ds
    assert [r.path for r in ds.records] == [good]
    assert f"skipped {named}: " in caplog.text and words in caption_lines(caplog.text, named)
    assert ds.summary.skipped and ds.summary.skipped[0].path == named
    assert _snapshot(root) == before


def caption_lines(text: str, named: Path) -> str:
    return "\n".join(line for line in text.splitlines() if f"skipped {named}: " in line)


# --------------------------------------------------------------------------------------------
# cases that stop the run: DatasetError naming the file or folder and the problem


def metadata_fifo(root):
    os.mkfifo(root / "metadata.jsonl")
    return {}, [f"{root / 'metadata.jsonl'}", "is a named pipe (FIFO), not a regular file"]


def metadata_link_to_dev_zero(root):
    (root / "meta.jsonl").symlink_to("/dev/zero")
    return {"metadata_file": f"{DATA}/meta.jsonl"}, [f"{root / 'meta.jsonl'}", "is a character device"]


def metadata_too_big(root):
    with open(root / "metadata.jsonl", "wb") as f:  # sparse: refused by its size, never read
        f.truncate(MAX_METADATA_BYTES + 1)
    return {}, [f"{root / 'metadata.jsonl'}", f"is {MAX_METADATA_BYTES + 1} bytes, more than the 64 MiB limit"]


def huge_repeat_folder(root):
    _png(root / "100000000_x" / "a.png")
    return {}, [f"repeat folder {root / '100000000_x'}", "100000000 repeats", f"limit of {MAX_REPEATS}"]


def absurdly_long_repeat_number(root):
    name = "9" * 200 + "_x"
    _png(root / name / "a.png")
    return {}, [f"repeat folder {root / name}", f"limit of {MAX_REPEATS}"]


def repeat_folder_times_repeats(root):
    _png(root / "5000_x" / "a.png")
    return {"repeats": 3}, [f"repeat folder {root / '5000_x'}", "15000 repeats per image",
                            f"limit of {MAX_REPEATS}"]


def repeats_setting(root):
    return {"repeats": MAX_REPEATS + 1}, [f"repeats must be at most {MAX_REPEATS}, got {MAX_REPEATS + 1}"]


ERROR_CASES = {f.__name__: f for f in (metadata_fifo, metadata_link_to_dev_zero, metadata_too_big,
                                       huge_repeat_folder, absurdly_long_repeat_number,
                                       repeat_folder_times_repeats, repeats_setting)}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_bad_dataset_stops_with_a_clear_error(tmp_path, case):
    root = tmp_path / DATA
    _good(root)
    entry, words = ERROR_CASES[case](root)
    before = _snapshot(root)
    err = _build(tmp_path, entry)
    assert isinstance(err, DatasetError), f"expected a DatasetError, got {err!r}"
    for w in words:
        assert w in str(err), (w, str(err))
    assert _snapshot(root) == before


# --------------------------------------------------------------------------------------------
# the rest: limits that keep data usable, and reads after the scan


def test_thin_strip_with_no_upscale_gets_a_bucket_within_the_limits(tmp_path):
    root = tmp_path / DATA
    _good(root)
    _png(root / "strip.png", (1000, 40))
    (root / "strip.txt").write_text("strip")
    before = _snapshot(root)
    ds = _build(tmp_path, {"bucket_no_upscale": True}, min_bucket_reso=64, max_bucket_reso=128, bucket_step=64)
    assert not isinstance(ds, Exception), ds
    buckets = {r.path.name: r.bucket for r in ds.records}
    assert buckets["strip.png"] == (128, 64)  # its own size would be 960x64 wide, past max_bucket_reso
    assert all(64 <= side <= 128 for b in ds.buckets for side in b)
    assert ds[0]["pixel_values"].shape[-2:] in {(64, 128), (64, 64)}
    assert _snapshot(root) == before


def test_repeats_at_the_limit_are_accepted(tmp_path):
    root = tmp_path / DATA
    _png(root / f"{MAX_REPEATS}_x" / "a.png")
    ds = _build(tmp_path)
    assert not isinstance(ds, Exception), ds
    assert len(ds) == MAX_REPEATS


def test_epoch_size_is_capped_before_samples_are_expanded(tmp_path):
    configs = dataset_configs_from_toml({"datasets": [{"dir": str(tmp_path)}]})
    per_image = MAX_REPEATS
    n = MAX_SAMPLES_PER_EPOCH // per_image + 1
    records = [ImageRecord(tmp_path / f"{i}.png", "x", 0, per_image, False, (64, 64), (64, 64), "0" * 64)
               for i in range(n)]
    with pytest.raises(DatasetError, match=f"{n * per_image} samples per epoch, more than the limit of "
                                           f"{MAX_SAMPLES_PER_EPOCH}"):
        ImageCaptionDataset(configs, records)


def test_image_replaced_by_a_fifo_after_the_scan_fails_fast(tmp_path):
    root = tmp_path / DATA
    good = _good(root)
    ds = _build(tmp_path)
    assert not isinstance(ds, Exception), ds
    good.unlink()
    os.mkfifo(good)
    result: dict[str, object] = {}

    def read():
        try:
            ds[0]
        except DatasetError as exc:
            result["err"] = exc

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(TIMEOUT_S)
    assert not thread.is_alive(), "reading a sample blocked on a FIFO"
    assert "named pipe (FIFO)" in str(result["err"]) and str(good) in str(result["err"])

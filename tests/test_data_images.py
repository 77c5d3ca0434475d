"""Image loading: EXIF orientation, mode conversion, and every kind of bad file."""
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lokr_diffusion.data import BadImageError, DatasetConfig, build_dataset, load_rgb, probe_image, to_rgb
from lokr_diffusion.errors import DatasetError


def cfg(dir, **kw) -> DatasetConfig:
    return DatasetConfig(dir=dir, resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_step=32,
                         missing_caption="empty", **kw)


def good(path: Path, size=(64, 64)) -> Path:
    Image.new("RGB", size, (10, 200, 10)).save(path)
    return path


# ---- orientation and modes


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red, right half blue
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree clockwise turn
    Image.fromarray(arr).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    info = probe_image(tmp_path / "rot.jpg")
    assert (info.width, info.height) == (20, 40)
    out = np.asarray(load_rgb(tmp_path / "rot.jpg")).astype(int)
    assert out.shape == (40, 20, 3)
    assert out[5, 10, 0] > 200 and out[5, 10, 2] < 60  # top is red after rotation
    assert out[35, 10, 2] > 200 and out[35, 10, 0] < 60  # bottom is blue


def test_rgba_is_composited_on_the_chosen_background():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgba.putpixel((1, 0), (255, 0, 0, 128))
    out = np.asarray(to_rgb(rgba, background=(0, 0, 255)))
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[1, 1]) == (0, 0, 255)  # fully transparent: background
    r, g, b = (int(v) for v in out[0, 1])
    assert abs(r - 128) <= 1 and g == 0 and abs(b - 127) <= 1


@pytest.mark.parametrize("make, expected", [
    (lambda: Image.new("L", (2, 2), 100), (100, 100, 100)),
    (lambda: Image.new("LA", (2, 2), (100, 0)), (255, 255, 255)),
    (lambda: Image.new("CMYK", (2, 2), (0, 255, 255, 0)), (255, 0, 0)),
    (lambda: Image.fromarray(np.full((2, 2), 128 * 257, dtype=np.uint16)), (128, 128, 128)),
    (lambda: Image.new("1", (2, 2), 1), (255, 255, 255)),
])
def test_modes_convert_to_rgb(make, expected):
    out = to_rgb(make())
    assert out.mode == "RGB" and tuple(np.asarray(out)[0, 0]) == expected


def test_palette_with_transparency(tmp_path):
    p = Image.new("P", (2, 2), 0)
    p.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    p.putpixel((1, 1), 1)
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png")
    out = np.asarray(load_rgb(tmp_path / "p.png", background=(0, 0, 0)))
    assert tuple(out[0, 0]) == (0, 0, 0) and tuple(out[1, 1]) == (0, 255, 0)


def test_sixteen_bit_png_and_cmyk_jpeg_through_the_dataset(tmp_path):
    Image.fromarray(np.full((64, 64), 65535, dtype=np.uint16)).save(tmp_path / "g16.png")
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    ds = build_dataset([cfg(tmp_path)], report=None)
    pix = {Path(ds[i]["path"]).name: ds[i]["pixel_values"] for i in range(len(ds))}
    assert pix["g16.png"].shape == (3, 64, 64) and pix["g16.png"].min() > 0.99  # white, not clipped
    assert pix["cmyk.jpg"][0].mean() > 0.9 and pix["cmyk.jpg"][1].mean() < -0.8  # red


# ---- bad input: one warning line per file, counted, the rest of the dataset still used


def _png_header_only(path: Path, width: int, height: int) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def _truncated_png(path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _truncated_jpeg(path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_FILES = {
    "zero.png": (lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
    "trunc.png": (_truncated_png, "truncated or corrupt image data"),
    "trunc.jpg": (_truncated_jpeg, "truncated or corrupt image data"),
    "text.png": (lambda p: p.write_text("this is not a picture"), "not an image (unrecognised format)"),
    "bomb.png": (lambda p: _png_header_only(p, 100_000, 100_000), "decompression bomb"),
    "broken_link.png": (lambda p: os.symlink(p.parent / "does-not-exist.png", p),
                        "cannot read: file not found"),
    "tiff_inside.png": (lambda p: Image.new("RGB", (8, 8)).save(p, format="TIFF"), "unsupported format TIFF"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_each_bad_image_is_skipped_with_one_warning(tmp_path, caplog, name):
    make, reason = BAD_FILES[name]
    good(tmp_path / "ok.png")
    make(tmp_path / name)
    with caplog.at_level(logging.WARNING, logger="lokr_diffusion.data"):
        ds = build_dataset([cfg(tmp_path)], report=None)
    assert [r.path.name for r in ds.records] == ["ok.png"]
    lines = [r.getMessage() for r in caplog.records if r.name == "lokr_diffusion.data"]
    assert len(lines) == 1
    assert lines[0].startswith(f"skipped {tmp_path / name}: {reason}")
    assert len(ds.summary.skipped) == 1


def test_probe_raises_bad_image_error_with_reason(tmp_path):
    (tmp_path / "z.png").write_bytes(b"")
    with pytest.raises(BadImageError, match="empty file"):
        probe_image(tmp_path / "z.png")


def test_pixel_limit_is_configurable(tmp_path, caplog):
    good(tmp_path / "small.png", (32, 32))
    good(tmp_path / "big.png", (128, 128))
    with caplog.at_level(logging.WARNING, logger="lokr_diffusion.data"):
        ds = build_dataset([cfg(tmp_path)], report=None, max_image_pixels=64 * 64)
    assert [r.path.name for r in ds.records] == ["small.png"]
    assert "big.png: decompression bomb: 128x128 = 16384 pixels is more than the limit of 4096" in caplog.text


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read files without permission")
def test_permission_denied_is_skipped(tmp_path, caplog):
    good(tmp_path / "ok.png")
    locked = good(tmp_path / "locked.png")
    locked.chmod(0)
    try:
        with caplog.at_level(logging.WARNING, logger="lokr_diffusion.data"):
            ds = build_dataset([cfg(tmp_path)], report=None)
    finally:
        locked.chmod(0o644)
    assert len(ds) == 1 and "locked.png: cannot read: permission denied" in caplog.text


def test_undecodable_caption_skips_its_image(tmp_path, caplog):
    good(tmp_path / "ok.png")
    (tmp_path / "ok.txt").write_text("fine", encoding="utf-8")
    good(tmp_path / "latin.png")
    (tmp_path / "latin.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    good(tmp_path / "bom.png")
    (tmp_path / "bom.txt").write_bytes("\ufeffwith bom\nsecond line ignored".encode("utf-8"))
    with caplog.at_level(logging.WARNING, logger="lokr_diffusion.data"):
        ds = build_dataset([cfg(tmp_path)], report=None)
    assert {r.path.name: r.caption for r in ds.records} == {"ok.png": "fine", "bom.png": "with bom"}
    assert caplog.text.count("skipped") == 1
    assert f"skipped {tmp_path / 'latin.png'}: caption is not valid UTF-8" in caplog.text
    assert "(latin.txt)" in caplog.text


def test_summary_counts_skipped_files_by_reason(tmp_path, capsys):
    good(tmp_path / "ok.png")
    for name in ("zero.png", "text.png", "trunc.png"):
        BAD_FILES[name][0](tmp_path / name)
    (tmp_path / "zero2.jpg").write_bytes(b"")
    build_dataset([cfg(tmp_path)])  # report=print
    out = capsys.readouterr().out
    assert ("skipped 4 files: 2 empty file, 1 not an image, 1 truncated or corrupt image data" in out)


def test_all_bad_is_an_empty_dataset_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.jpg").write_text("nope")
    with pytest.raises(DatasetError, match="no usable images .*2 file\\(s\\) were found but skipped"):
        build_dataset([cfg(tmp_path)], report=None)


def test_file_that_changes_after_the_scan_is_reported(tmp_path):
    path = good(tmp_path / "a.png")
    ds = build_dataset([cfg(tmp_path)], report=None)
    path.write_bytes(b"")
    with pytest.raises(DatasetError, match="a.png: empty file .*changed after the dataset was scanned"):
        ds[0]

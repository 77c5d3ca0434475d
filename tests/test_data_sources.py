"""Source layouts: caption files, kohya repeat folders, metadata.jsonl, several datasets."""
import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from lokr_diffusion.data import DatasetConfig, balance_regularisation, build_dataset, find_images
from lokr_diffusion.errors import DatasetError


def img(path: Path, size=(64, 64), colour=(200, 30, 30), fmt=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


def cap(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def cfg(dir, **kw) -> DatasetConfig:
    kw.setdefault("resolution", 64)
    kw.setdefault("min_bucket_reso", 32)
    kw.setdefault("max_bucket_reso", 128)
    kw.setdefault("bucket_step", 32)
    return DatasetConfig(dir=dir, **kw)


def build(*configs, **kw):
    kw.setdefault("report", None)
    return build_dataset(list(configs), **kw)


def captions_by_name(ds):
    return {r.path.name: r.caption for r in ds.records}


def test_plain_folder_with_txt_and_caption_files(tmp_path):
    for ext in ("png", "jpg", "jpeg", "webp", "bmp", "PNG"):
        img(tmp_path / f"a_{ext}.{ext}", fmt={"jpg": "JPEG", "PNG": "PNG"}.get(ext))
        cap(tmp_path / f"a_{ext}.txt", f"caption {ext}\n")
    img(tmp_path / "b.png")
    cap(tmp_path / "b.caption", "from .caption")
    (tmp_path / "notes.md").write_text("not an image")
    ds = build(cfg(tmp_path))
    assert captions_by_name(ds) == {"a_PNG.PNG": "caption PNG", "a_bmp.bmp": "caption bmp",
                                    "a_jpeg.jpeg": "caption jpeg", "a_jpg.jpg": "caption jpg",
                                    "a_png.png": "caption png", "a_webp.webp": "caption webp",
                                    "b.png": "from .caption"}
    assert len(ds) == 7


def test_caption_extension_is_configurable_and_preferred(tmp_path):
    img(tmp_path / "a.png")
    cap(tmp_path / "a.txt", "txt caption")
    cap(tmp_path / "a.tags", "tags caption")
    img(tmp_path / "b.png")
    cap(tmp_path / "b.txt", "falls back to txt")
    ds = build(cfg(tmp_path, caption_extension="tags"))
    assert captions_by_name(ds) == {"a.png": "tags caption", "b.png": "falls back to txt"}
    ds = build(cfg(tmp_path))
    assert captions_by_name(ds)["a.png"] == "txt caption"


def test_kohya_repeat_folders(tmp_path):
    for i in range(3):
        img(tmp_path / "10_mychar" / f"{i}.png")
    img(tmp_path / "10_mychar" / "captioned.png")
    cap(tmp_path / "10_mychar" / "captioned.txt", "mychar, smiling")
    img(tmp_path / "2_sks dog" / "d.png")
    img(tmp_path / "loose.png")
    cap(tmp_path / "loose.txt", "loose image")
    img(tmp_path / "other" / "ignored.png")  # not a repeat folder, not recursive
    ds = build(cfg(tmp_path, repeats=1))
    by_name = {r.path.name: r for r in ds.records}
    assert {n: r.repeats for n, r in by_name.items()} == {"0.png": 10, "1.png": 10, "2.png": 10,
                                                          "captioned.png": 10, "d.png": 2, "loose.png": 1}
    assert by_name["0.png"].caption == "mychar"  # class token from the folder name
    assert by_name["d.png"].caption == "sks dog"
    assert by_name["captioned.png"].caption == "mychar, smiling"
    assert len(ds) == 4 * 10 + 2 + 1  # samples per epoch count repeats, like kohya


def test_entry_repeats_multiply_folder_repeats(tmp_path):
    img(tmp_path / "3_x" / "a.png")
    img(tmp_path / "b.png")
    cap(tmp_path / "b.txt", "b")
    ds = build(cfg(tmp_path, repeats=2))
    assert {r.path.name: r.repeats for r in ds.records} == {"a.png": 6, "b.png": 2}


def test_recursive_switch(tmp_path):
    img(tmp_path / "top.png")
    img(tmp_path / "sub" / "deeper" / "inner.png")
    img(tmp_path / "5_tok" / "nested" / "n.png")
    img(tmp_path / ".hidden" / "h.png")
    found = find_images(cfg(tmp_path, class_token="t"))
    assert [p.path.name for p in found.images] == ["top.png"]
    assert any("'sub' was not searched" in n for n in found.notes)
    found = find_images(cfg(tmp_path, class_token="t", recursive=True))
    assert sorted(p.path.name for p in found.images) == ["inner.png", "n.png", "top.png"]
    assert {p.path.name: p.repeats for p in found.images}["n.png"] == 5


def test_metadata_jsonl_imagefolder(tmp_path):
    img(tmp_path / "train" / "a.png")
    img(tmp_path / "train" / "sub" / "b.png")
    img(tmp_path / "train" / "c.png")
    cap(tmp_path / "train" / "a.txt", "ignored: metadata wins")
    rows = [{"file_name": "a.png", "text": "first"}, {"file_name": "sub/b.png", "text": "second"},
            {"file_name": "c.png"}]
    (tmp_path / "train" / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = build(cfg(tmp_path / "train", class_token="thing"))  # auto-detected
    assert captions_by_name(ds) == {"a.png": "first", "b.png": "second", "c.png": "thing"}
    # explicit metadata_file elsewhere, file names relative to it when dir is not set
    (tmp_path / "meta.jsonl").write_text(json.dumps({"file_name": "train/a.png", "text": "x"}))
    ds = build(DatasetConfig(metadata_file=tmp_path / "meta.jsonl", resolution=64, min_bucket_reso=32,
                             max_bucket_reso=128, bucket_step=32))
    assert captions_by_name(ds) == {"a.png": "x"}


def test_metadata_errors_name_the_line(tmp_path):
    img(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{not json\n')
    with pytest.raises(DatasetError, match=r"metadata.jsonl:2 is not valid JSON"):
        build(cfg(tmp_path))
    (tmp_path / "metadata.jsonl").write_text('{"text": "no file"}\n')
    with pytest.raises(DatasetError, match=r"metadata.jsonl:1 needs a \"file_name\""):
        build(cfg(tmp_path))
    with pytest.raises(DatasetError, match="metadata file .*missing.jsonl does not exist"):
        build(DatasetConfig(metadata_file=tmp_path / "missing.jsonl"))


def test_metadata_entry_for_a_missing_file_is_skipped(tmp_path, caplog):
    img(tmp_path / "a.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a"}\n'
                                             '{"file_name": "gone.png", "text": "b"}\n')
    with caplog.at_level(logging.WARNING, logger="lokr_diffusion.data"):
        ds = build(cfg(tmp_path))
    assert len(ds) == 1
    assert "gone.png: cannot read: file not found" in caplog.text


def test_missing_folder_says_what_and_where(tmp_path):
    with pytest.raises(DatasetError) as exc:
        build(cfg(tmp_path / "nope"))
    msg = str(exc.value)
    assert "nope does not exist" in msg and "png/jpg/jpeg/webp/bmp" in msg and ".txt" in msg


def test_empty_folder_says_what_and_where(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(DatasetError) as exc:
        build(cfg(tmp_path))
    msg = str(exc.value)
    assert "no usable images" in msg and str(tmp_path.resolve()) in msg
    assert "'sub' was not searched" in msg


def test_only_regularisation_data_is_an_error(tmp_path):
    img(tmp_path / "a.png")
    with pytest.raises(DatasetError, match="only regularisation"):
        build(cfg(tmp_path, is_reg=True, class_token="person"))


def test_several_datasets_with_their_own_settings(tmp_path):
    for i in range(3):
        img(tmp_path / "subject" / f"s{i}.png", size=(64, 64))
    for i in range(10):
        img(tmp_path / "reg" / f"r{i}.png", size=(32, 96))
    ds = build(cfg(tmp_path / "subject", repeats=4, class_token="sks cat", caption_prefix="photo of "),
               cfg(tmp_path / "reg", is_reg=True, class_token="cat"))
    train = [r for r in ds.records if not r.is_reg]
    reg = [r for r in ds.records if r.is_reg]
    assert {r.caption for r in train} == {"sks cat"} and {r.bucket for r in train} == {(64, 64)}
    # 12 training samples: reg images balanced to the same count, kohya style (first 10 once,
    # then one more pass adding one repeat each to the first two)
    assert sum(r.repeats for r in reg) == 12
    assert [r.repeats for r in reg] == [2, 2, 1, 1, 1, 1, 1, 1, 1, 1]
    assert ds[0]["caption"] == "photo of sks cat"
    assert {r.bucket for r in reg} == {(32, 128)}


@pytest.mark.parametrize("train, reg, expected", [
    (5, [1, 1, 1], [2, 2, 1]),
    (2, [1, 1, 1, 1], [1, 1, 0, 0]),
    (10, [3, 3], [5, 5]),
    (4, [10], [10]),
    (0, [1], [0]),
])
def test_balance_regularisation(train, reg, expected):
    assert balance_regularisation(train, reg) == expected

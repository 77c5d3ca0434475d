"""Caption options: prefix/suffix, shuffle with keep_tokens, dropouts, missing captions."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lokr_diffusion.data import CaptionOptions, DatasetConfig, augment_caption, build_dataset
from lokr_diffusion.data.captions import static_caption_variants
from lokr_diffusion.errors import DatasetError

TAGS = "sks, 1girl, red hair, smiling, outdoors, sky"


def run(options: CaptionOptions, n=400, caption=TAGS):
    return [augment_caption(caption, options, np.random.default_rng(i)) for i in range(n)]


def test_defaults_pass_captions_through():
    assert set(run(CaptionOptions(), n=5)) == {TAGS}
    assert set(run(CaptionOptions(), n=5, caption="A photo. Of a cat, maybe")) == {"A photo. Of a cat, maybe"}


def test_prefix_and_suffix_are_verbatim_and_never_shuffled():
    out = run(CaptionOptions(prefix="trigger, ", suffix=", best quality", shuffle=True), n=50)
    assert all(c.startswith("trigger, ") and c.endswith(", best quality") for c in out)


def test_shuffle_keeps_the_first_keep_tokens():
    out = run(CaptionOptions(shuffle=True, keep_tokens=2))
    tags = TAGS.split(", ")
    for c in out:
        got = c.split(", ")
        assert got[:2] == tags[:2] and sorted(got) == sorted(tags)
    assert len(set(out)) > 20  # 4! = 24 orders of the rest


def test_caption_dropout_rate_and_that_it_drops_prefix_too():
    out = run(CaptionOptions(prefix="sks ", caption_dropout=0.25), n=2000)
    frac = out.count("") / len(out)
    assert 0.21 < frac < 0.29
    assert set(out) == {"", "sks " + TAGS}
    assert set(run(CaptionOptions(caption_dropout=1.0), n=10)) == {""}


def test_tag_dropout_never_drops_kept_tokens():
    out = run(CaptionOptions(tag_dropout=0.5, keep_tokens=1), n=2000)
    assert all(c.split(", ")[0] == "sks" for c in out)
    rest = TAGS.split(", ")[1:]
    kept = np.mean([sum(t in c.split(", ") for t in rest) / len(rest) for c in out])
    assert 0.45 < kept < 0.55
    # order is preserved without shuffle
    for c in out[:50]:
        got = c.split(", ")
        assert got == [t for t in TAGS.split(", ") if t in got]
    assert set(run(CaptionOptions(tag_dropout=1.0, keep_tokens=2), n=10)) == {"sks, 1girl"}


def test_same_rng_same_caption():
    opts = CaptionOptions(shuffle=True, tag_dropout=0.3, caption_dropout=0.1, keep_tokens=1)
    assert run(opts, n=30) == run(opts, n=30)


def test_static_variants_for_the_text_cache():
    assert static_caption_variants("a cat", CaptionOptions(prefix="sks, ")) == ["sks, a cat"]
    assert static_caption_variants("a cat", CaptionOptions(caption_dropout=0.1)) == ["a cat", ""]


# ---- through the dataset: options per dataset, missing captions per setting


def _img(path: Path, caption: str | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (1, 2, 3)).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption)


def _cfg(dir, **kw):
    return DatasetConfig(dir=dir, resolution=64, min_bucket_reso=64, max_bucket_reso=64, **kw)


def test_dataset_applies_caption_options(tmp_path):
    _img(tmp_path / "a.png", TAGS)
    ds = build_dataset([_cfg(tmp_path, repeats=50, shuffle_caption=True, keep_tokens=1,
                             caption_prefix="photo, ", caption_suffix=" :)")], seed=3, report=None)
    caps = [ds[(epoch, i)]["caption"] for epoch in range(2) for i in range(len(ds))]
    assert all(c.startswith("photo, sks, ") and c.endswith(" :)") for c in caps)
    assert len(set(caps)) > 10  # each repeat and epoch shuffles on its own


@pytest.mark.parametrize("setting, caption", [("class_token", "mychar"), ("empty", "")])
def test_missing_and_empty_captions(tmp_path, setting, caption):
    _img(tmp_path / "5_mychar" / "none.png")
    _img(tmp_path / "5_mychar" / "blank.png", "  \n\n")
    ds = build_dataset([_cfg(tmp_path, missing_caption=setting)], report=None)
    assert {r.caption for r in ds.records} == {caption}


def test_missing_caption_uses_config_class_token(tmp_path):
    _img(tmp_path / "a.png")
    ds = build_dataset([_cfg(tmp_path, class_token="a dog")], report=None)
    assert ds.records[0].caption == "a dog"


def test_missing_caption_error_names_files(tmp_path):
    _img(tmp_path / "ok.png", "fine")
    _img(tmp_path / "bare.png")
    with pytest.raises(DatasetError, match=r"1 image\(s\) have no caption or an empty one .*bare.png"):
        build_dataset([_cfg(tmp_path, missing_caption="error")], report=None)


def test_missing_caption_without_class_token_explains_the_fix(tmp_path):
    _img(tmp_path / "bare.png")
    with pytest.raises(DatasetError, match="no caption and no class token: .*bare.png; add .txt files, "
                                           "set class_token"):
        build_dataset([_cfg(tmp_path)], report=None)

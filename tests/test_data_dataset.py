"""The batch contract the trainer relies on: keys, shapes, SDXL conditioning, tokenizers."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lokr_diffusion.data import (DatasetConfig, build_dataset, dataset_configs_from_toml, make_loader,
                                 sdxl_add_time_ids)

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "example_dataset"


def test_toml_to_batches_on_the_example_dataset(capsys):
    configs = dataset_configs_from_toml({
        "resolution": 128, "min_bucket_reso": 64, "max_bucket_reso": 256, "bucket_step": 32,
        "datasets": [{"dir": "example_dataset", "caption_prefix": "shapes, "}],
    }, base_dir=ASSETS.parent)
    ds = build_dataset(configs, batch_size=4, seed=0)
    out = capsys.readouterr().out
    assert "20 images, 20 samples per epoch" in out and "128x128" in out and "skipped 0 files" in out
    batches = list(make_loader(ds))
    assert sum(len(b["captions"]) for b in batches) == 20
    b = batches[0]
    assert set(b) == {"pixel_values", "captions", "original_size", "crop_top_left", "target_size", "flipped",
                      "is_reg", "paths", "indices", "data_position"}
    n, c, h, w = b["pixel_values"].shape
    assert c == 3 and b["pixel_values"].dtype == torch.float32
    assert -1.0 <= b["pixel_values"].min() and b["pixel_values"].max() <= 1.0
    assert b["target_size"].tolist() == [[h, w]] * n
    assert all(cap.startswith("shapes, a") for cap in b["captions"])


def test_sdxl_conditioning_values(tmp_path):
    # a 2:1 image in a 64x64-area bucket set: check the numbers end to end
    Image.new("RGB", (200, 100), (0, 0, 0)).save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("wide")
    ds = build_dataset([DatasetConfig(dir=tmp_path, resolution=64, min_bucket_reso=32, max_bucket_reso=128,
                                      bucket_step=32, random_crop=True, flip=True, repeats=40)], report=None)
    rec = ds.records[0]
    assert rec.bucket == (96, 32)  # 2:1 is nearest to 3:1 among 32-step buckets of area <= 64*64
    crops = set()
    for i in range(len(ds)):
        item = ds[(0, i)]
        assert item["original_size"] == (100, 200) and item["target_size"] == (32, 96)
        top, left = item["crop_top_left"]
        # 200x100 covers 96x32 at scale 0.48 -> 96x48: only vertical slack
        assert left == 0 and 0 <= top <= 16
        crops.add(top)
    assert len(crops) > 3
    batch = next(iter(make_loader(ds, batch_size=4)))
    ids = sdxl_add_time_ids(batch)
    assert ids.shape == (4, 6) and ids[0, :2].tolist() == [100, 200] and ids[0, 4:].tolist() == [32, 96]


def test_crop_top_left_is_measured_in_the_flipped_image(tmp_path):
    arr = np.zeros((32, 96, 3), dtype=np.uint8)
    arr[:, :48] = 255  # left half white
    Image.fromarray(arr).save(tmp_path / "a.png")
    ds = build_dataset([DatasetConfig(dir=tmp_path, class_token="x", resolution=32, min_bucket_reso=32,
                                      max_bucket_reso=32, bucket_step=32, flip=True, repeats=30,
                                      random_crop=True)], report=None)
    for i in range(len(ds)):
        item = ds[(0, i)]
        top, left = item["crop_top_left"]
        pix = item["pixel_values"]
        # where the crop window sits in the image the model sees decides how much white it holds
        white_cols = int((pix[0, 0] > 0).sum())
        seen = np.asarray(Image.fromarray(arr).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                          if item["flipped"] else Image.fromarray(arr))
        assert white_cols == int((seen[0, left:left + 32, 0] > 0).sum())


class WordTokenizer:
    """Just enough of the Hugging Face tokenizer call contract."""

    def __init__(self, max_length):
        self.model_max_length = max_length

    def __call__(self, text, padding, truncation, max_length, return_tensors):
        assert padding == "max_length" and truncation and return_tensors == "pt"
        rows = []
        for t in ([text] if isinstance(text, str) else text):
            ids = [1] + [len(w) for w in t.split()][: max_length - 2] + [2]
            rows.append(ids + [0] * (max_length - len(ids)))

        class Out:
            input_ids = torch.tensor(rows)
        return Out()


def test_tokenizers_add_input_ids_per_tokenizer():
    ds = build_dataset([DatasetConfig(dir=ASSETS, resolution=64, min_bucket_reso=32, max_bucket_reso=128,
                                      bucket_step=32)], tokenizers=[WordTokenizer(8), WordTokenizer(12)],
                       report=None)
    batch = next(iter(make_loader(ds, batch_size=2)))
    a, b = batch["input_ids"]
    assert a.shape == (len(batch["captions"]), 8) and b.shape == (len(batch["captions"]), 12)
    assert a[0, 1].item() == len(batch["captions"][0].split()[0])


def test_real_clip_tokenizer(tmp_path):
    from transformers import CLIPTokenizer
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "red</w>": 3}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(vocab_file=str(tmp_path / "vocab.json"), merges_file=str(tmp_path / "merges.txt"),
                        model_max_length=16)
    ds = build_dataset([DatasetConfig(dir=ASSETS, resolution=64, min_bucket_reso=32, max_bucket_reso=128,
                                      bucket_step=32)], tokenizers=[tok], report=None)
    batch = next(iter(make_loader(ds, batch_size=3)))
    assert batch["input_ids"][0].shape == (len(batch["captions"]), 16)
    assert batch["input_ids"][0].dtype == torch.long


def test_set_text_after_build_tokenises_expanded_captions_like_the_trainer(tmp_path):
    """The trainer scans data before the model exists, then hands over its tokenizers and the
    trigger word's caption expansion in one call; items must hold exactly the ids that
    `lokr_diffusion.text.tokenize` (the trainer's text encoding) gives the expanded caption, and
    the same ids a single-caption tokenizer call gives (what the dataset did before)."""
    from transformers import CLIPTokenizer

    from lokr_diffusion.families.clip_tokenizer import write_tiny_tokenizer
    from lokr_diffusion.text import tokenize

    tok = CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(tmp_path / "tok")))
    ds = build_dataset([DatasetConfig(dir=ASSETS, resolution=64, min_bucket_reso=32, max_bucket_reso=128,
                                      bucket_step=32, shuffle_caption=True)], report=None)
    assert ds.tokenizers is None and "input_ids" not in ds[0]

    def expand(text):
        return text.replace("a ", "a red ")

    ds.set_text([tok, tok], expand)
    for i in range(3):
        item = ds[(1, i)]
        text = expand(item["caption"])
        single = tok(text, padding="max_length", truncation=True, max_length=tok.model_max_length,
                     return_tensors="pt").input_ids[0]
        assert all(torch.equal(ids, single) for ids in item["input_ids"])
        assert all(torch.equal(ids, ref[0]) for ids, ref in zip(item["input_ids"], tokenize([tok, tok], [text])))
    batch = next(iter(make_loader(ds, batch_size=2)))
    assert torch.equal(batch["input_ids"][0], tokenize([tok], [expand(c) for c in batch["captions"]])[0])
    ds.set_text(None)
    assert "input_ids" not in ds[0]
    with pytest.raises(ValueError, match="expand_caption needs tokenizers"):
        ds.set_text(None, expand)


def test_dataset_module_does_not_import_the_loader():
    import ast
    import inspect

    import lokr_diffusion.data.dataset as dataset_module
    tree = ast.parse(inspect.getsource(dataset_module))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "loader" not in imported and not any(m and m.endswith(".loader") for m in imported)
    assert not hasattr(dataset_module.ImageCaptionDataset, "dataloader")


def test_regularisation_flag_reaches_the_batch(tmp_path):
    for name in ("reg", "train"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (64, 64)).save(tmp_path / name / "a.png")
    ds = build_dataset([DatasetConfig(dir=tmp_path / "train", class_token="sks dog", resolution=64, min_bucket_reso=64,
                                      max_bucket_reso=64),
                        DatasetConfig(dir=tmp_path / "reg", class_token="dog", is_reg=True, resolution=64,
                                      min_bucket_reso=64, max_bucket_reso=64)], batch_size=2, report=None)
    batch = next(iter(make_loader(ds)))
    assert sorted(zip(batch["captions"], batch["is_reg"].tolist())) == [("dog", True), ("sks dog", False)]


@pytest.mark.parametrize("bad", [-1, 10**6])
def test_index_out_of_range(bad):
    ds = build_dataset([DatasetConfig(dir=ASSETS, resolution=64, min_bucket_reso=32, max_bucket_reso=128,
                                      bucket_step=32)], report=None)
    with pytest.raises(IndexError):
        ds[bad]

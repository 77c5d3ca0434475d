"""`[data]` TOML → DatasetConfig: inheritance, strict types, helpful errors."""
from pathlib import Path

import pytest

from lokr_diffusion.data import DatasetConfig, dataset_configs_from_toml
from lokr_diffusion.errors import DatasetError


def test_entries_inherit_data_defaults_and_override_them():
    configs = dataset_configs_from_toml({
        "resolution": 768, "caption_extension": "caption", "flip": True,
        "datasets": [{"dir": "a", "repeats": 10}, {"dir": "b", "is_reg": True, "flip": False,
                                                    "resolution": [640, 512]}],
    })
    a, b = configs
    assert a.dir == Path("a") and a.repeats == 10 and a.flip is True and a.resolution == (768, 768)
    assert a.caption_extension == ".caption"  # leading dot added
    assert b.is_reg is True and b.flip is False and b.resolution == (640, 512) and b.repeats == 1
    # untouched keys keep the dataclass defaults
    assert a.bucket_step == 64 and a.missing_caption == "class_token" and a.cache_latents == "off"


def test_data_table_alone_is_one_dataset():
    (cfg,) = dataset_configs_from_toml({"dir": "imgs", "shuffle_caption": True, "keep_tokens": 2})
    assert cfg.dir == Path("imgs") and cfg.shuffle_caption and cfg.keep_tokens == 2


def test_relative_paths_resolve_against_base_dir(tmp_path):
    (cfg,) = dataset_configs_from_toml({"datasets": [{"dir": "imgs", "cache_dir": "c",
                                                      "metadata_file": "/abs/m.jsonl"}]}, base_dir=tmp_path)
    assert cfg.dir == tmp_path / "imgs" and cfg.cache_dir == tmp_path / "c"
    assert cfg.metadata_file == Path("/abs/m.jsonl")


@pytest.mark.parametrize("table, key, suggestion", [
    ({"datasets": [{"dir": "a", "repeat": 3}]}, "repeat", "repeats"),
    ({"dir": "a", "caption_extention": ".txt"}, "caption_extention", "caption_extension"),
    ({"datasets": [{"dir": "a", "shuffle_captions": True}]}, "shuffle_captions", "shuffle_caption"),
])
def test_unknown_key_names_it_and_suggests(table, key, suggestion):
    with pytest.raises(DatasetError, match=f"unknown key '{key}'. Did you mean '{suggestion}'"):
        dataset_configs_from_toml(table)


def test_unknown_key_without_close_match_lists_known_keys():
    with pytest.raises(DatasetError, match="unknown key 'zzz'. Known keys: .*alpha_background"):
        dataset_configs_from_toml({"dir": "a", "zzz": 1})


def test_extra_keys_belong_to_the_trainer():
    (cfg,) = dataset_configs_from_toml({"dir": "a", "batch_size": 4}, extra_keys=["batch_size"])
    assert cfg.dir == Path("a")


@pytest.mark.parametrize("key, value, expected", [
    ("repeats", "10", "repeats must be an integer, got '10' \\(string\\)"),
    ("repeats", True, "repeats must be an integer, got True \\(boolean\\)"),
    ("flip", 1, "flip must be true or false, got 1 \\(integer\\)"),
    ("caption_dropout", "0.1", "caption_dropout must be a number"),
    ("resolution", [512], "resolution must be an integer or \\[width, height\\]"),
    ("dir", 5, "dir must be a path"),
    ("caption_prefix", 3, "caption_prefix must be a string"),
    ("alpha_background", [1, 2], "alpha_background must be"),
])
def test_wrong_type_names_the_key(key, value, expected):
    with pytest.raises(DatasetError, match=r"#1.*" + expected):
        dataset_configs_from_toml({"datasets": [{"dir": "a", key: value}]})


@pytest.mark.parametrize("values, expected", [
    ({"repeats": 0}, "repeats must be at least 1"),
    ({"caption_dropout": 1.5}, "caption_dropout must be a probability"),
    ({"missing_caption": "skip"}, "missing_caption must be one of 'class_token', 'empty', 'error'"),
    ({"cache_latents": "yes"}, "cache_latents must be one of 'memory', 'disk', 'off'"),
    ({"bucket_step": 20}, "bucket_step must be a positive multiple of 8"),
    ({"min_bucket_reso": 1024, "max_bucket_reso": 512}, "larger than max_bucket_reso"),
    ({"resolution": 500}, "resolution must be a positive multiple of 8"),
    ({"random_crop": True, "cache_latents": "disk"}, "random_crop cannot be combined with cache_latents"),
])
def test_impossible_values_are_rejected(values, expected):
    with pytest.raises(DatasetError, match=expected):
        dataset_configs_from_toml({"datasets": [{"dir": "a", **values}]})


def test_a_dataset_needs_a_source():
    with pytest.raises(DatasetError, match="no datasets"):
        dataset_configs_from_toml({"resolution": 512})
    with pytest.raises(DatasetError, match="needs `dir`"):
        dataset_configs_from_toml({"datasets": [{"repeats": 2}]})
    with pytest.raises(DatasetError, match="array of tables"):
        dataset_configs_from_toml({"datasets": {"dir": "a"}})


def test_alpha_background_forms():
    cfgs = dataset_configs_from_toml({"datasets": [{"dir": "a", "alpha_background": "black"},
                                                   {"dir": "a", "alpha_background": "#FF8000"},
                                                   {"dir": "a", "alpha_background": [1, 2, 3]}]})
    assert [c.alpha_background for c in cfgs] == [(0, 0, 0), (255, 128, 0), (1, 2, 3)]
    with pytest.raises(DatasetError, match="alpha_background must be one of"):
        dataset_configs_from_toml({"dir": "a", "alpha_background": "mauve"})


def test_python_construction_is_validated_too():
    assert DatasetConfig(dir="x", resolution=256).resolution == (256, 256)
    with pytest.raises(DatasetError, match="tag_dropout"):
        DatasetConfig(dir="x", tag_dropout=-0.1)

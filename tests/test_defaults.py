"""Defaults that used to trip people: bucket limits that ignore the resolution, dtype names torch
users write, the config overriding Accelerate in silence, and inspect on a file that is no adapter."""
from pathlib import Path

import pytest

from lokr_diffusion.cli import build_parser, main
from lokr_diffusion.data import DatasetConfig, build_dataset, dataset_configs_from_toml
from lokr_diffusion.data.config import derived_bucket_limits
from lokr_diffusion.errors import ConfigError, DatasetError
from lokr_diffusion.training.config import config_from_dict
from lokr_diffusion.training.precision import resolve_mixed_precision

ROOT = Path(__file__).resolve().parent.parent
DATASET = ROOT / "assets" / "example_dataset"
README = (ROOT / "README.md").read_text(encoding="utf-8")


# -- bucket limits follow the resolution unless set ------------------------------------------------

def test_resolution_64_trains_without_bucket_settings():
    """The example images are 128 px; at resolution 64 with no bucket keys they used to be refused
    (min_bucket_reso stayed 256)."""
    (cfg,) = dataset_configs_from_toml({"resolution": 64, "dir": str(DATASET)})
    assert (cfg.min_bucket_reso, cfg.max_bucket_reso) == (64, 128)
    ds = build_dataset([cfg], batch_size=2, report=None)
    assert len(ds) == len(list(DATASET.glob("*.png"))) and ds.buckets == [(64, 64)]


@pytest.mark.parametrize("resolution, step, limits", [
    ((512, 512), 64, (256, 1024)),  # what the fixed defaults were: nothing changes at 512
    ((1024, 1024), 64, (512, 2048)),  # the shipped SDXL / Flux.1 configs' explicit values
    ((768, 768), 64, (384, 1536)),
    ((640, 384), 32, (224, 992)),  # the side of the area is 495: 247 down and 990 up to the 32 grid
    ((64, 64), 64, (64, 128)),  # never below one step
    ((8192, 8192), 64, (4096, 8192)),  # never above the largest resolution
])
def test_derived_bucket_limits(resolution, step, limits):
    assert derived_bucket_limits(resolution, step) == limits
    cfg = DatasetConfig(dir="x", resolution=resolution, bucket_step=step)
    assert (cfg.min_bucket_reso, cfg.max_bucket_reso) == limits


def test_bucket_limits_set_anywhere_are_kept():
    configs = dataset_configs_from_toml({"resolution": 512, "min_bucket_reso": 128, "datasets": [
        {"dir": "a"}, {"dir": "b", "resolution": 1024}, {"dir": "c", "max_bucket_reso": 128}]})
    assert [(c.min_bucket_reso, c.max_bucket_reso) for c in configs] == [(128, 1024), (128, 2048), (128, 128)]
    # one limit set: the other follows the resolution without crossing it
    assert DatasetConfig(dir="x", resolution=512, max_bucket_reso=128).min_bucket_reso == 128
    assert DatasetConfig(dir="x", resolution=512, min_bucket_reso=64).max_bucket_reso == 1024


def test_a_bucket_step_larger_than_the_resolution_is_named():
    with pytest.raises(DatasetError, match=r"bucket_step \(64\) is larger than the resolution 32x32"):
        dataset_configs_from_toml({"resolution": 32, "dir": "x"})
    assert DatasetConfig(dir="x", resolution=32, bucket_step=32).min_bucket_reso == 32


def test_bucket_defaults_are_documented():
    assert "| `min_bucket_reso` | int | half the `resolution` side |" in README
    assert "| `max_bucket_reso` | int | twice the `resolution` side |" in README


# -- torch's dtype names are aliases of the short ones ---------------------------------------------

def _config(**sections):
    raw = {"model": {"pretrained_model": "m"}, "train": {"max_steps": 1}, "data": {"dir": "d"}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return config_from_dict(raw)


@pytest.mark.parametrize("section, key, word, stored", [
    ("output", "save_dtype", "float32", "fp32"),
    ("output", "save_dtype", "BFloat16", "bf16"),
    ("output", "save_dtype", "half", "fp16"),
    ("output", "save_dtype", "fp16", "fp16"),
    ("model", "base_dtype", "bfloat16", "bf16"),
    ("model", "base_dtype", "fp8", "fp8"),
    ("model", "base_dtype", "auto", "auto"),
    ("train", "mixed_precision", "bfloat16", "bf16"),
    ("train", "mixed_precision", "float16", "fp16"),
    ("train", "mixed_precision", "float32", "no"),
    ("train", "mixed_precision", "fp32", "no"),
    ("train", "mixed_precision", "no", "no"),
])
def test_dtype_keys_take_torch_names(section, key, word, stored):
    cfg = _config(**{section: {key: word}})
    assert getattr(getattr(cfg, section), key) == stored
    assert cfg.to_dict()[section][key] == stored  # config.json shows one spelling


@pytest.mark.parametrize("section, key, value, needle", [
    ("output", "save_dtype", "float64", "'float64' is not one of fp32, fp16, bf16"),
    ("output", "save_dtype", "no", "'no' is not one of fp32, fp16, bf16"),
    ("output", "save_dtype", 16, "expected a string, got 16 (integer)"),
    ("train", "mixed_precision", "fp8", "'fp8' is not one of no, fp16, bf16"),
])
def test_dtype_keys_refuse_other_words(section, key, value, needle):
    with pytest.raises(ConfigError) as info:
        _config(**{section: {key: value}})
    assert f"{section}.{key}:" in str(info.value) and needle in str(info.value)


def test_dtype_options_take_torch_names():
    parser = build_parser()
    assert parser.parse_args(["convert", "a", "b", "--dtype", "bfloat16"]).dtype == "bf16"
    assert parser.parse_args(["merge", "--base", "m", "--adapter", "a", "--out", "o", "--dtype", "float16"]).dtype \
        == "fp16"
    assert parser.parse_args(["plan", "--model", "sd15", "--mixed-precision", "float32"]).mixed_precision == "no"
    assert parser.parse_args(["extract", "--base", "b", "--tuned", "t", "--out", "o", "--dtype", "FP32"]).dtype \
        == "fp32"


def test_dtype_aliases_are_documented():
    assert "| `save_dtype` | string | `\"fp16\"` | `fp32`, `fp16`, `bf16` (or torch's names: `float32`, `float16`, " \
           "`bfloat16`) |" in README


# -- mixed_precision: unset means Accelerate's ------------------------------------------------------

@pytest.mark.parametrize("configured, accelerate, used, notice", [
    (None, None, "no", False),  # plain python, nothing configured
    (None, "bf16", "bf16", False),  # accelerate config / launch --mixed_precision decides
    (None, "fp16", "fp16", False),
    (None, "no", "no", False),
    ("bf16", None, "bf16", False),
    ("bf16", "no", "bf16", False),  # `accelerate launch` says "no" whenever nothing was configured
    ("bf16", "bf16", "bf16", False),
    ("bf16", "fp16", "bf16", True),  # both set and different: the config's, said aloud
    ("no", "bf16", "no", True),
])
def test_mixed_precision_rule(configured, accelerate, used, notice):
    env = {} if accelerate is None else {"ACCELERATE_MIXED_PRECISION": accelerate}
    value, message = resolve_mixed_precision(configured, env)
    assert value == used and bool(message) == notice
    if notice:
        assert f"train.mixed_precision = {configured!r}" in message and repr(accelerate) in message
        assert "Remove train.mixed_precision from the config to let Accelerate decide" in message


def test_mixed_precision_accelerate_asks_for_fp8():
    with pytest.raises(ConfigError, match="Accelerate is configured with mixed precision 'fp8'"):
        resolve_mixed_precision(None, {"ACCELERATE_MIXED_PRECISION": "fp8"})
    assert resolve_mixed_precision("bf16", {"ACCELERATE_MIXED_PRECISION": "fp8"})[0] == "bf16"


def test_start_run_uses_accelerates_precision_when_the_config_has_none(tmp_path, monkeypatch, caplog):
    """The trainer's first phase, with a real Accelerator: unset follows ACCELERATE_MIXED_PRECISION
    (what `accelerate launch` sets), set wins and is announced."""
    from accelerate.state import AcceleratorState

    from lokr_diffusion.training import lock
    from lokr_diffusion.training.loop import start_run

    def run(mixed, accelerate, out):
        AcceleratorState._reset_state(reset_partial_state=True)
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", accelerate)
        cfg = _config(output={"dir": str(tmp_path / out)}, logging={"tensorboard": False},
                      train={} if mixed is None else {"mixed_precision": mixed})
        try:
            r = start_run(cfg, None, False)
            return cfg.train.mixed_precision, r.accelerator.mixed_precision
        finally:
            lock.release_all()
            AcceleratorState._reset_state(reset_partial_state=True)

    assert run(None, "bf16", "a") == ("bf16", "bf16")
    assert not [r for r in caplog.records if "mixed precision" in r.getMessage()]
    assert run("no", "bf16", "b") == ("no", "no")
    (notice,) = [r.getMessage() for r in caplog.records if "mixed precision" in r.getMessage()]
    assert "train.mixed_precision = 'no' from the config is used; Accelerate asked for 'bf16'" in notice


# -- inspect on a file that is not an adapter ------------------------------------------------------

def test_inspect_base_model_weights_exit_2_and_say_what_they_are(tiny_sd15_path, capsys):
    weights = Path(tiny_sd15_path) / "unet" / "diffusion_pytorch_model.safetensors"
    code = main(["inspect", str(weights)])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert "not an adapter file" in captured.err and "UNet" in captured.err and "base model" in captured.err
    assert "expected" in captured.err and "lokr_w1" in captured.err


def test_kohya_import_keeps_kohyas_bucket_limits(tmp_path):
    """kohya's bucket limits are 256..1024 whatever the resolution; with the limits here following
    the resolution, an import that does not set them writes kohya's."""
    from lokr_diffusion.tools.kohya import import_kohya

    argv = ["sdxl_train_network.py", "--pretrained_model_name_or_path", "m.safetensors", "--resolution", "1024",
            "--enable_bucket", "--train_data_dir", "img", "--network_module", "networks.lora"]
    data = import_kohya(argv=argv, kohya_dir=tmp_path).config["data"]
    assert (data["min_bucket_reso"], data["max_bucket_reso"]) == (256, 1024)
    argv += ["--min_bucket_reso", "512", "--max_bucket_reso", "2048"]
    data = import_kohya(argv=argv, kohya_dir=tmp_path).config["data"]
    assert (data["min_bucket_reso"], data["max_bucket_reso"]) == (512, 2048)

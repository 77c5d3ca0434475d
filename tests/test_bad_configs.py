"""Bad configs through the trainer's command line: each stops with exit code 2 and a message that
names the key and the problem, before anything is written, without a traceback.

Every number that reaches the training math is checked finite and in range at config time, so a
NaN learning rate or a seed NumPy refuses cannot surface an hour into a run."""
from pathlib import Path

import pytest

from lokr_diffusion.errors import ConfigError
from lokr_diffusion.training.config import config_from_dict, load_config
from lokr_diffusion.training.loop import main as train_main

from .test_train import write_config

NAN, INF = float("nan"), float("inf")


def _ds(**values):
    """Keys of the one [[data.datasets]] entry write_config makes."""
    return {"datasets": [{"dir": str(Path(__file__).resolve().parent.parent / "assets" / "example_dataset"),
                          **values}]}


CASES = {
    # NaN / inf in every class of float field
    "learning_rate nan": ({"train": {"learning_rate": NAN}}, "train.learning_rate: must be a finite number, got nan"),
    "learning_rate -inf": ({"train": {"learning_rate": -INF}}, "train.learning_rate: must be a finite number, got -inf"),
    "unet_lr inf": ({"train": {"unet_lr": INF}}, "train.unet_lr: must be a finite number, got inf"),
    "text_encoder_lr nan": ({"train": {"text_encoder_lr": NAN}}, "train.text_encoder_lr: must be a finite number"),
    "embedding_lr inf": ({"train": {"embedding_lr": INF}}, "train.embedding_lr: must be a finite number"),
    "weight_decay nan": ({"train": {"weight_decay": NAN}}, "train.weight_decay: must be a finite number, got nan"),
    "max_grad_norm inf": ({"train": {"max_grad_norm": INF}}, "train.max_grad_norm: must be a finite number"),
    "min_snr_gamma nan": ({"train": {"min_snr_gamma": NAN}}, "train.min_snr_gamma: must be a finite number"),
    "noise_offset inf": ({"train": {"noise_offset": INF}}, "train.noise_offset: must be a finite number"),
    "prior_loss_weight nan": ({"train": {"prior_loss_weight": NAN}}, "train.prior_loss_weight: must be a finite"),
    "ema_decay nan": ({"train": {"ema_decay": NAN}}, "train.ema_decay: must be a finite number"),
    "alpha nan": ({"network": {"alpha": NAN}}, "network.alpha: must be a finite number, got nan"),
    "conv_alpha inf": ({"network": {"conv_dim": 4, "conv_alpha": INF}}, "network.conv_alpha: must be a finite number"),
    "rank_dropout nan": ({"network": {"rank_dropout": NAN}}, "network.rank_dropout: must be a finite number"),
    "module_dropout inf": ({"network": {"module_dropout": INF}}, "network.module_dropout: must be a finite number"),
    "guidance_scale nan": ({"sample": {"guidance_scale": NAN}}, "sample.guidance_scale: must be a finite number"),
    "caption_dropout nan": ({"data": {"caption_dropout": NAN}}, "[data]: caption_dropout must be a finite number"),
    "tag_dropout inf": ({"data": _ds(tag_dropout=INF)}, "#1: tag_dropout must be a finite number, got inf"),
    # values out of range
    "negative weight_decay": ({"train": {"weight_decay": -0.1}}, "train.weight_decay: must not be negative, got -0.1"),
    "ema_decay 1": ({"train": {"ema_decay": 1.0}}, "train.ema_decay: must be less than 1, got 1.0"),
    "alpha 0": ({"network": {"alpha": 0.0}}, "network.alpha: must be positive, got 0.0"),
    "train seed negative": ({"train": {"seed": -1}}, "train.seed: must not be negative, got -1"),
    "train seed 2**32": ({"train": {"seed": 2**32}}, "train.seed: must be at most 2147483647, got 4294967296"),
    "sample seed negative": ({"sample": {"seed": -5}}, "sample.seed: must not be negative, got -5"),
    "factor -5": ({"network": {"factor": -5}}, "network.factor: expected a non-zero integer: -1 (balanced) or a "
                                               "positive factor, got -5"),
    "repeats absurd": ({"data": _ds(repeats=10**6)}, "repeats must be at most 10000, got 1000000"),
    "max_steps absurd": ({"train": {"max_steps": 10**12}}, "train.max_steps: must be at most 1000000000"),
    "batch_size absurd": ({"train": {"batch_size": 10**6}}, "train.batch_size: must be at most 4096"),
    "resolution absurd": ({"data": {"resolution": 100000}}, "resolution must be a positive multiple of 8"),
    "num_images absurd": ({"sample": {"num_images": 10000}}, "sample.num_images: must be at most 64"),
    "embedding_vectors absurd": ({"network": {"embedding_trigger": "zqx", "embedding_vectors": 500}},
                                 "network.embedding_vectors: must be at most 75, got 500"),
    "max_timestep absurd": ({"train": {"max_timestep": 2000}}, "train.max_timestep: must be at most 1000"),
    # choices that could not be built
    "piecewise scheduler": ({"train": {"lr_scheduler": "piecewise_constant"}},
                            "train.lr_scheduler: 'piecewise_constant' is not one of"),
    "polynomial below lr_end": ({"train": {"lr_scheduler": "polynomial", "learning_rate": 1e-8}},
                                "train.lr_scheduler: 'polynomial' decays to 1e-07"),
    "family sd4": ({"model": {"family": "sd4"}}, "model.family: 'sd4' is not one of auto, sd1, sd2, sdxl"),
    "family qwen-image (loaded, not trained)": ({"model": {"family": "qwen-image"}},
                                                 "model.family: 'qwen-image' is not one of auto, sd1"),
    # wrong types
    "seed float": ({"train": {"seed": 1.5}}, "train.seed: expected int, got 1.5 (float)"),
    "dim bool": ({"network": {"dim": True}}, "network.dim: expected int, got True (boolean)"),
    "prompts string": ({"sample": {"prompts": "a cat"}}, "sample.prompts: expected list[str], got 'a cat'"),
    "data flip int": ({"data": {"flip": 1}}, "[data]: flip must be true or false, got 1 (integer)"),
    "data repeats string": ({"data": _ds(repeats="10")}, "repeats must be an integer, got '10' (string)"),
    "data resolution string": ({"data": {"resolution": "512"}}, "resolution must be an integer or [width, height]"),
    "data caption_dropout string": ({"data": {"caption_dropout": "0.1"}}, "caption_dropout must be a number"),
    "data cache_dir number": ({"data": {"cache_dir": 5}}, "cache_dir must be a path (non-empty string), got 5"),
    "data cache_latents choice": ({"data": _ds(cache_latents="yes")}, "cache_latents must be one of 'memory', "
                                                                      "'disk', 'off', got 'yes'"),
    "data unknown key": ({"data": _ds(repeat=3)}, "unknown key 'repeat'. Did you mean 'repeats'?"),
}


def _assert_refused(tmp_path: Path, capsys, config: Path, needle: str, argv: tuple[str, ...] = ()) -> str:
    code = train_main(["--config", str(config), *argv])
    out, err = capsys.readouterr()
    assert code == 2, (code, err)
    assert needle in err, err
    assert "Traceback" not in out + err
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [config.name]  # nothing written beside the config
    return err


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_is_refused_naming_the_key(case, tmp_path, capsys):
    sections, needle = dict(CASES[case][0]), CASES[case][1]
    # write_config's own `model` argument is the model path: [model] keys go in as --set overrides
    overrides = [f"model.{k}={v}" for k, v in sections.pop("model", {}).items()]
    config = write_config(tmp_path, tmp_path / "no-such-model", **sections)
    _assert_refused(tmp_path, capsys, config, needle, tuple(a for o in overrides for a in ("--set", o)))


def test_there_are_enough_cases():
    assert len(CASES) >= 35


def test_toml_syntax_error_names_file_and_line(tmp_path, capsys):
    config = tmp_path / "config.toml"
    config.write_text('[model]\npretrained_model = "x"\n[train]\nmax_steps = = 3\n')
    err = _assert_refused(tmp_path, capsys, config, "not valid TOML")
    assert str(config) in err and "line 4" in err, err


def test_not_utf8_is_refused(tmp_path, capsys):
    config = tmp_path / "config.toml"
    config.write_bytes(b'[model]\npretrained_model = "\xff"\n')
    _assert_refused(tmp_path, capsys, config, "not UTF-8")


def test_override_with_nan_is_refused(tmp_path, capsys):
    config = write_config(tmp_path, tmp_path / "no-such-model")
    _assert_refused(tmp_path, capsys, config, "train.learning_rate: must be a finite number, got nan",
                    ("--set", "train.learning_rate=nan"))


def test_missing_optimizer_package_is_refused_at_config_time(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("prodigyopt") is not None:
        pytest.skip("prodigyopt is installed here")
    config = write_config(tmp_path, tmp_path / "no-such-model", train={"optimizer": "prodigy"})
    _assert_refused(tmp_path, capsys, config, "train.optimizer = 'prodigy' needs prodigyopt: pip install prodigyopt")


def test_utf8_bom_is_accepted(tmp_path, capsys):
    config = write_config(tmp_path, tmp_path / "no-such-model")
    config.write_bytes(b"\xef\xbb\xbf" + config.read_bytes())
    cfg = load_config(config)
    assert cfg.train.max_steps == 3 and cfg.base_dir == tmp_path.resolve()
    code = train_main(["--config", str(config)])  # past the config: it stops only at the missing model
    out, err = capsys.readouterr()
    assert code == 2 and "no-such-model" in err and "TOML" not in err, err
    assert "Traceback" not in out + err


# -- relative resume paths are relative to the config file, like every other path -----------------

def _raw(**train):
    return {"model": {"pretrained_model": "x"}, "train": {"max_steps": 1, **train}, "data": {"dir": "d"}}


def test_relative_resume_resolves_against_the_config_folder(tmp_path):
    cfg = config_from_dict(_raw(resume="out/checkpoints/step-000010"), base_dir=tmp_path)
    assert cfg.train.resume == str(tmp_path / "out" / "checkpoints" / "step-000010")
    assert config_from_dict(_raw(resume="latest"), base_dir=tmp_path).train.resume == "latest"
    absolute = str(tmp_path / "elsewhere")
    assert config_from_dict(_raw(resume=absolute), base_dir=Path("/nowhere")).train.resume == absolute
    assert config_from_dict(_raw(), base_dir=tmp_path).train.resume is None
    with pytest.raises(ConfigError, match="train.resume"):
        config_from_dict(_raw(resume=""), base_dir=tmp_path)


def test_relative_resume_in_a_file_and_from_set(tmp_path, monkeypatch):
    sub = tmp_path / "runs"
    sub.mkdir()
    config = write_config(sub, tmp_path / "model", train={"resume": "ckpt/step-000002"})
    monkeypatch.chdir(tmp_path)  # the working directory must not matter
    assert load_config(config).train.resume == str(sub.resolve() / "ckpt" / "step-000002")
    over = load_config(config, ["train.resume=other/step-000004"])
    assert over.train.resume == str(sub.resolve() / "other" / "step-000004")
    assert load_config(config, ["train.resume=latest"]).train.resume == "latest"

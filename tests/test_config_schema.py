"""The one config mechanism (lokr_diffusion.schema): fields declared once, read and checked the
same way in every section, and every choice it accepts is one the trainer can build."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from lokr_diffusion import AdapterConfig
from lokr_diffusion.errors import ConfigError, DatasetError
from lokr_diffusion.schema import Scope, build, check_fields, help_text, keys_of, markdown_table, read_table, setting
from lokr_diffusion.training.config import (FAMILIES, LR_SCHEDULERS, MAX_SEED, OPTIMIZERS, REFERENCE, SampleSection,
                                            config_from_dict)
from lokr_diffusion.training.loop import main as train_main


@dataclass
class Toy:
    rate: float = setting(0.5, gt=0, le=1, help="a rate")
    count: int = setting(1, ge=1, help="how many")
    mode: str = setting("a", choices=("a", "b"), help="which mode")
    internal: int = 0  # no setting: not a TOML key


def test_a_section_declared_with_setting_is_read_checked_and_documented():
    scope = Scope("toy", ConfigError)
    assert build(Toy, {"rate": 1, "count": 3}, scope) == Toy(rate=1.0, count=3)
    assert keys_of(Toy) == ["rate", "count", "mode"]
    for table, needle in [({"rat": 0.1}, "toy.rat: unknown key (did you mean 'rate'?)"),
                          ({"internal": 1}, "toy.internal: unknown key"),
                          ({"count": "3"}, "toy.count: expected int, got '3' (string)"),
                          ({"count": 2.0}, "toy.count: expected int"),
                          ({"rate": float("nan")}, "toy.rate: must be a finite number, got nan"),
                          ({"rate": 0.0}, "toy.rate: must be positive, got 0.0"),
                          ({"rate": 2}, "toy.rate: must be at most 1, got 2.0"),
                          ({"mode": "c"}, "toy.mode: 'c' is not one of a, b")]:
        with pytest.raises(ConfigError) as info:
            build(Toy, table, scope)
        assert needle in str(info.value)
    entry = Scope("[[x]] #2", DatasetError, dotted=False)
    with pytest.raises(DatasetError, match=r"\[\[x\]\] #2: count must be an integer, got '3' \(string\)"):
        read_table(Toy, {"count": "3"}, entry)
    with pytest.raises(DatasetError, match=r"#2: mode must be one of 'a', 'b', got 'c'"):
        check_fields(Toy(mode="c"), entry)
    table = markdown_table(Toy)
    assert "| `rate` | float | `0.5` | (0, 1] | a rate |" in table and "internal" not in table


def test_python_construction_gets_the_same_checks():
    with pytest.raises(ConfigError, match="network.factor: expected a non-zero integer"):
        AdapterConfig(factor=-5)
    with pytest.raises(ConfigError, match="network.alpha: must be a finite number"):
        AdapterConfig(alpha=float("inf"))
    with pytest.raises(ConfigError, match="network.dim: expected a positive integer"):
        AdapterConfig(dim=2.5)
    assert AdapterConfig(factor=-1).factor == -1 and AdapterConfig(factor=8, include=["*attn*"]).include == ("*attn*",)


@pytest.mark.parametrize("name", LR_SCHEDULERS)
def test_every_scheduler_choice_builds_with_the_trainers_arguments(name):
    from diffusers.optimization import get_scheduler

    cfg = config_from_dict({"model": {"pretrained_model": "x"}, "data": {"dir": "d"},
                            "train": {"max_steps": 10, "lr_scheduler": name, "lr_warmup_steps": 2}})
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=cfg.train.learning_rate)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=cfg.train.lr_warmup_steps,
                              num_training_steps=cfg.train.max_steps)
    for _ in range(cfg.train.max_steps):
        optimizer.step()
        scheduler.step()
    assert all(np.isfinite(scheduler.get_last_lr()))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_choice_builds_or_is_refused_at_config_time(name):
    from lokr_diffusion.training.optim import build_optimizer

    raw = {"model": {"pretrained_model": "x"}, "data": {"dir": "d"}, "train": {"max_steps": 1, "optimizer": name}}
    try:
        cfg = config_from_dict(raw)
    except ConfigError as exc:
        assert f"train.optimizer = {name!r} needs" in str(exc) and "pip install" in str(exc)
        return
    param = torch.nn.Parameter(torch.ones(4))
    opt = build_optimizer(name, [{"params": [param]}], cfg.train.learning_rate, cfg.train.weight_decay)
    param.grad = torch.ones(4)
    opt.step()
    assert torch.isfinite(param).all()


def test_model_families_are_unchanged():
    assert FAMILIES[:4] == ("auto", "sd1", "sd2", "sdxl") and "sd2-v" in FAMILIES and "sd15" in FAMILIES


def test_seed_ranges_fit_what_the_seeds_are_passed_to():
    # train.seed: accelerate's set_seed(seed + process index) reaches numpy.random.seed (< 2**32)
    np.random.seed(MAX_SEED + 1024)
    # sample.seed: torch generators get seed + k for each image
    top = SampleSection.__dataclass_fields__["seed"].metadata["lokr_diffusion.schema"].le
    torch.Generator().manual_seed(int(top) + 63)


def test_help_config_lists_keys_and_explains_one_section(capsys):
    with pytest.raises(SystemExit) as info:
        train_main(["--help-config"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name, cls, _ in REFERENCE:
        assert f"[{name}]" in out
        assert all(key in out for key in keys_of(cls))
    with pytest.raises(SystemExit):
        train_main(["--help-config", "train"])
    out = capsys.readouterr().out
    assert "  seed (int) = 42   allowed: [0, 2147483647]" in out and "gradient clipping (0 turns it off)" in out
    with pytest.raises(SystemExit) as info:
        train_main(["--help-config", "trian"])
    assert info.value.code == 2 and "did you mean 'train'?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_main(["--help"])
    assert "--help-config" in capsys.readouterr().out


def test_help_text_and_readme_come_from_the_same_help():
    text = help_text("data")
    assert "repeats (int) = 1   allowed: [1, 10000]" in text and "times each image is seen per epoch" in text


def test_optional_optimizer_packages_are_named():
    from lokr_diffusion.training.config import OPTIONAL_OPTIMIZERS

    assert set(OPTIONAL_OPTIMIZERS) <= set(OPTIMIZERS)
    for module, install in OPTIONAL_OPTIMIZERS.values():
        assert install.startswith(f"pip install {module}")

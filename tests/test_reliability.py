"""Crash safety: SIGKILL at random moments, SIGTERM, diverging runs."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from .helpers import wait_for
from .test_train import ROOT, ok_here, train_here, write_config

pytestmark = pytest.mark.slow


def _start(config: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--config", str(config), *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)


def _temporary(path: Path) -> bool:
    return any(part.endswith(".tmp") for part in path.parts)


def assert_all_readable(out: Path) -> int:
    """Every finished file in the output folder opens; returns how many were checked."""
    checked = 0
    for path in sorted(out.rglob("*")):
        if path.is_dir() or _temporary(path) or "logs" in path.parts:
            continue
        if path.suffix == ".safetensors":
            load_file(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".png":
            with Image.open(path) as im:
                im.load()
        elif path.suffix in (".bin", ".pkl"):
            torch.load(path, map_location="cpu", weights_only=True)
        else:
            continue
        checked += 1
    for state in (out / "checkpoints").glob("step-*"):
        if not _temporary(state):
            assert (state / "model.safetensors").exists() and (state / "lokr_manifest.json").exists(), state
            assert not list(state.glob("*.pkl")), state  # nothing pickled beyond optimizer.bin / scheduler.bin
    return checked


def _steps(out: Path) -> int:
    states = [int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*") if not p.name.endswith(".tmp")]
    return max(states, default=0)


def test_sigkill_at_random_moments_then_resume(tiny_sd15_path, tmp_path, capsys):
    sections = dict(network={"rank_dropout": 0.1},
                    data={"cache_latents": "disk"},
                    train={"max_steps": 8, "lr_scheduler": "cosine", "lr_warmup_steps": 2, "resume": "latest"},
                    output={"save_every_steps": 1, "keep_last": 2})
    (tmp_path / "ref").mkdir()
    ref_cfg = write_config(tmp_path / "ref", tiny_sd15_path, **sections)
    ok_here(capsys, ref_cfg)  # the uninterrupted reference, in this process
    reference = load_file(tmp_path / "ref" / "out" / "t.safetensors")

    (tmp_path / "run").mkdir()
    cfg = write_config(tmp_path / "run", tiny_sd15_path, **sections)
    out = tmp_path / "run" / "out"
    rng = random.Random(7)
    kills = []
    while len(kills) < 5:
        proc = _start(cfg)
        before = _steps(out)
        if not kills:  # the first kill lands inside a checkpoint write
            hit = wait_for(lambda: any((out / "checkpoints").glob("*.tmp")) or any(out.glob(".*.tmp")), proc)
            moment = "during a checkpoint write"
        else:
            hit = wait_for(lambda: _steps(out) > before, proc)
            time.sleep(rng.uniform(0.0, 0.6))
            moment = f"{rng.random():.2f}s after step {before + 1}"
        if proc.poll() is not None:
            break  # finished before the kill
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert hit
        kills.append((moment, _steps(out)))
        assert_all_readable(out)
    final = _start(cfg)
    log = final.communicate(timeout=600)[0]
    assert final.returncode == 0, log[-3000:]
    assert len(kills) >= 5, kills
    assert not any(_temporary(p) for p in out.rglob("*")), "half-written files were left behind"
    assert assert_all_readable(out) > 3
    result = load_file(out / "t.safetensors")
    diff = max((result[k] - reference[k]).abs().max().item() for k in reference)
    assert diff <= 1e-6, (diff, kills)


def test_sigterm_saves_and_prints_the_resume_hint(tiny_sd15_path, tmp_path):
    cfg = write_config(tmp_path, tiny_sd15_path, train={"max_steps": 400})
    out = tmp_path / "out"
    proc = _start(cfg)
    wait_for(lambda: (out / "config.json").exists(), proc)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 3, log[-3000:]
    assert "stopped by signal 15" in log and "--set train.resume=latest" in log
    step = _steps(out)
    assert 0 < step < 400
    assert (out / f"t-step{step:06d}.safetensors").exists()
    assert_all_readable(out)


def test_diverging_run_stops_with_a_clear_message(tiny_sd15_path, tmp_path, capsys):
    cfg = write_config(tmp_path, tiny_sd15_path, train={"max_steps": 50, "learning_rate": 1e30, "max_nonfinite_steps": 3,
                                                        "max_grad_norm": 0.0, "optimizer": "sgd"})
    code, log = train_here(capsys, cfg)
    assert code == 2, log[-3000:]
    assert "3 non-finite" in log and "in a row" in log and "Traceback" not in log
    assert not (tmp_path / "out" / "t.safetensors").exists()  # non-finite weights are never saved

"""Adapters on a frozen base sharded with FSDP, over gloo on two CPU processes.

Accelerate applies FSDP on GPUs only (on the CPU an FSDP launch config runs data-parallel, which
the trainer says; see test_unapplied_sharding_is_reported). What can be checked here is the part
that is this project's: adapters attached to a denoiser whose frozen blocks are sharded with
torch's FSDP2 `fully_shard` (as Accelerate's FSDP2 plugin shards them) train with the gradients
of the unsharded model, while each process holds half the frozen weights.
"""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_adapter_gradients_on_an_fsdp_sharded_base():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    from tests.test_train import _free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "tests.fsdp_worker", "sd15", "flux"]  # the two kinds of denoiser: UNet and DiT
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted((r["family"], r["rank"]) for r in rows) == [("flux", 0), ("flux", 1), ("sd15", 0), ("sd15", 1)]
    for r in rows:
        assert r["local"] * 2 == r["frozen"], r  # each process holds half the frozen weights
        assert r["grads"] == r["expected_grads"] > 0, r
        assert r["worst_rel"] < 1e-5, r


def test_unapplied_sharding_is_reported(monkeypatch, caplog):
    from accelerate import Accelerator

    from lokr_diffusion.training.loop import _warn_unsharded

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with caplog.at_level(logging.WARNING):
        _warn_unsharded(Accelerator(cpu=True))
    assert "asks for FSDP" in caplog.text and "whole frozen model on every process" in caplog.text

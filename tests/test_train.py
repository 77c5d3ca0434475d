"""The trainer end to end on tiny models: real `accelerate launch` subprocesses, and runs in this
process (`train_here`) where a test checks what is trained rather than how the run is launched."""
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from lokr_diffusion import load_network
from lokr_diffusion.dora import init_magnitude
from lokr_diffusion.errors import ConfigError
from lokr_diffusion.training.config import config_from_dict, load_config, parse_override
from lokr_diffusion.training.logs import read_log
from lokr_diffusion.training.loop import main as train_main

from .helpers import load_components

ROOT = Path(__file__).resolve().parent.parent
DATASET = ROOT / "assets" / "example_dataset"


def write_config(tmp_path: Path, model: Path, **sections) -> Path:
    """A small TOML config; `sections` override keys per section ({"train": {...}})."""
    base = {
        "model": {"pretrained_model": str(model)},
        "network": {"algo": "lokr", "preset": "attn-mlp", "factor": 4, "dim": 4, "alpha": 2.0},
        "data": {"resolution": 64, "min_bucket_reso": 64, "max_bucket_reso": 128, "bucket_step": 64,
                 "cache_latents": "memory", "datasets": [{"dir": str(DATASET)}]},
        "train": {"max_steps": 3, "batch_size": 2, "learning_rate": 1e-3, "seed": 1},
        "output": {"dir": str(tmp_path / "out"), "name": "t", "save_dtype": "fp32"},
        "logging": {"trackers": ["tensorboard"]},
    }
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    lines = []
    for section, values in base.items():
        if section == "data":
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
    data = dict(base["data"])
    datasets = data.pop("datasets")
    lines.append("[data]")
    lines += [f"{k} = {_toml(v)}" for k, v in data.items()]
    for d in datasets:
        lines.append("[[data.datasets]]")
        lines += [f"{k} = {_toml(v)}" for k, v in d.items()]
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\") + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + " }"
    return repr(v)


def launch(config: Path, *extra: str, processes: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    launcher = ["--cpu"] if processes == 1 else ["--multi_gpu", "--num_processes", str(processes),
                                                 "--main_process_port", str(_free_port())]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "train.py"), "--config", str(config), *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def train_here(capsys, config: Path, *extra: str) -> tuple[int, str]:
    """(exit code, output) of the trainer run in this process: the same `main` that `train.py`
    calls, without the ten seconds of imports a fresh process pays. For runs that test what is
    trained; `launch` keeps the end-to-end tests on a real `accelerate launch`. The trainer's
    log lines are shown as a fresh process shows them (its logging.basicConfig does nothing
    under pytest, which has its own handlers)."""
    logger = logging.getLogger("lokr_diffusion")
    handler, level = logging.StreamHandler(sys.stderr), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        code = train_main(["--config", str(config), *extra])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def ok_here(capsys, config: Path, *extra: str) -> str:
    code, log = train_here(capsys, config, *extra)
    assert code == 0, log[-5000:]
    return log


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def _masks_for(dataset: Path, out: Path) -> Path:
    """A mask per image of `dataset`: the left half trains, the right half does not."""
    out.mkdir()
    for image in dataset.glob("*.png"):
        w, h = Image.open(image).size
        mask = Image.new("L", (w, h), 0)
        mask.paste(255, (0, 0, w // 2, h))
        mask.save(out / image.name)
    return out


@pytest.mark.slow
def test_sd15_end_to_end(tiny_sd15_path, tmp_path):
    """With the same folder as regularisation images too, weighted 2 (prior preservation); masked
    loss from a mask folder on the training images (the regularisation ones have none); samples
    from a prompt file with per-prompt settings; and the sd-scripts options together: Huber
    loss, multires noise, input perturbation, clip skip (text cache and samples), optimizer
    arguments, per-group weight decay, cosine restarts."""
    masks = _masks_for(DATASET, tmp_path / "masks")
    (tmp_path / "prompts.txt").write_text("# samples\na red circle --w 64 --h 32 --d 5 --n blurry --l 6.5\n")
    kohya = {"loss_type": "huber", "huber_schedule": "snr", "huber_c": 0.1, "multires_noise_iterations": 4,
             "multires_noise_discount": 0.3, "ip_noise_gamma": 0.1, "clip_skip": 2,
             "optimizer_args": {"betas": [0.9, 0.99], "eps": 1e-7}, "unet_weight_decay": 0.0,
             "lr_scheduler": "cosine_with_restarts", "lr_scheduler_num_cycles": 2}
    cfg = write_config(tmp_path, tiny_sd15_path, train={"max_steps": 3, "min_snr_gamma": 5.0, "prior_loss_weight": 2.0,
                                                        "masked_loss": True, **kohya},
                       data={"datasets": [{"dir": str(DATASET), "conditioning_data_dir": str(masks)},
                                          {"dir": str(DATASET), "is_reg": True}]},
                       output={"save_every_steps": 2},
                       sample={"prompt_file": "prompts.txt", "every_steps": 2, "steps": 2, "num_images": 1,
                               "width": 64, "height": 64})
    log = _ok(launch(cfg))
    out = tmp_path / "out"
    adapter = out / "t.safetensors"
    assert adapter.exists() and (out / "t-step000002.safetensors").exists()
    assert "adapter identical on all 1 process(es)" in log
    assert "requires torchvision" not in log  # lokr_diffusion.quiet, installed before the imports
    assert f"loss masks from {masks}" in log and "no loss masks (every pixel trains)" in log
    assert "huber loss (huber_c 0.1, snr schedule), multires noise (4 levels, discount 0.3), input perturbation 0.1" \
        in log
    assert (out / "config.json").exists()
    samples = sorted((out / "samples").glob("*.png"))
    assert [p.name for p in samples] == ["step000002-00-a-red-circle.png", "step000003-00-a-red-circle.png"]
    assert all(Image.open(p).size == (64, 32) for p in samples)  # the prompt's --w / --h, not [sample]'s
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    sd = load_file(adapter)
    assert all(torch.isfinite(v).all() for v in sd.values())
    assert any(v.abs().sum() > 0 for k, v in sd.items() if "lokr_w1" in k)
    with safe_open(adapter, "pt") as f:
        meta = f.metadata()
    assert (meta["ss_clip_skip"], meta["ss_loss_type"], meta["ss_multires_noise_iterations"]) == ("2", "huber", "4")
    unet, tes = load_components(tiny_sd15_path)
    net, report = load_network(adapter, unet=unet, text_encoders=tes, strict=True)
    assert report.patched == {"unet": 192}  # attn-mlp on the SD1.5 block structure
    net.remove()
    lycoris_kohya = pytest.importorskip("lycoris.kohya")
    from .test_oracle_lycoris import _kohya_views
    unet_view, te_views = _kohya_views(unet, tes, False)
    lyco, _ = lycoris_kohya.create_network_from_weights(1.0, str(adapter), None, te_views[0], unet_view)
    assert len(lyco.unet_loras) == len(net.module_keys())


@pytest.mark.slow
def test_sdxl_end_to_end_with_text_encoder(tiny_sdxl_path, tmp_path):
    """Also DoRA and Tucker: the ResNet convs of the `full` preset get Tucker cores, every module a magnitude."""
    cfg = write_config(tmp_path, tiny_sdxl_path,
                       network={"algo": "loha", "dim": 2, "train_text_encoder": True, "preset": "full", "conv_dim": 2,
                                "weight_decompose": True, "use_tucker": True},
                       train={"max_steps": 2, "text_encoder_lr": 5e-4},
                       sample={"prompts": ["a blue square"], "every_steps": 2, "steps": 2, "num_images": 1,
                               "width": 64, "height": 64})
    log = _ok(launch(cfg))
    adapter = tmp_path / "out" / "t.safetensors"
    sd = load_file(adapter)
    assert any(k.startswith("lora_unet_input_blocks_") for k in sd)
    assert any(k.startswith("lora_te1_text_model_") for k in sd) and any(k.startswith("lora_te2_text_model_") for k in sd)
    modules = {k.rsplit(".", 1)[0] for k in sd if k.endswith(".alpha")}
    assert {k.rsplit(".", 1)[0] for k in sd if k.endswith(".dora_scale")} == modules
    tucker = {k.rsplit(".", 1)[0] for k in sd if k.endswith(".hada_t1")}
    assert tucker and all(sd[f"{m}.hada_t1"].shape[2:] == (3, 3) for m in tucker)
    unet, tes = load_components(tiny_sdxl_path)
    net, report = load_network(adapter, unet=unet, text_encoders=tes, strict=True)
    assert set(report.patched) == {"unet", "te1", "te2"}
    trained = next(a for a in net.adapters() if a.key in tucker)  # the magnitudes moved from the base norms
    assert not torch.allclose(trained.dora_scale, init_magnitude(trained.base.weight))
    net.remove()
    assert "family sdxl" in log


@pytest.mark.slow
def test_exact_resume_matches_uninterrupted_run(tiny_sd15_path, tmp_path, capsys):
    """Stop after 2 of 4 steps, resume; the adapter and the trigger embedding equal a 4-step
    run's (fp32, CPU). Both hold out a validation split; the interrupted run validates at every
    step, the other at step 3 and the end, which must not change what is trained. The CSV log
    of the resumed run keeps the steps before the resume, and both runs draw the loss chart."""
    common = dict(network={"rank_dropout": 0.1, "embedding_trigger": "zqv"},
                  data={"datasets": [{"dir": str(DATASET), "caption_prefix": "zqv, "}]},
                  train={"max_steps": 4, "lr_scheduler": "constant"}, output={"save_every_steps": 2},
                  logging={"trackers": []})
    validation = {"split": 0.2, "seed": 5, "batch_size": 3, "timesteps": [200, 700]}
    (tmp_path / "a").mkdir()
    full = write_config(tmp_path / "a", tiny_sd15_path, validation={**validation, "every_steps": 3}, **common)
    ok_here(capsys, full)
    (tmp_path / "b").mkdir()
    part = write_config(tmp_path / "b", tiny_sd15_path, validation={**validation, "every_steps": 1}, **common)
    log = ok_here(capsys, part, "--set", "train.max_steps=2")
    assert "validation: 4 image(s) held out of the training set" in log
    at_step_2 = load_file(tmp_path / "b" / "out" / "t_emb.safetensors")["emb_params"]
    log = ok_here(capsys, part, "--set", "train.resume=latest")
    assert "resumed from" in log and "step-000002" in log
    for name in ("t.safetensors", "t_emb.safetensors"):
        a = load_file(tmp_path / "a" / "out" / name)
        b = load_file(tmp_path / "b" / "out" / name)
        assert a.keys() == b.keys()
        diff = max((a[k] - b[k]).abs().max().item() for k in a)
        assert diff <= 1e-6, (name, diff)
    assert (a["emb_params"] - at_step_2).abs().max() > 0  # the vectors kept training after the resume
    rows = {run: read_log(tmp_path / run / "out" / "logs" / "t_loss.csv") for run in "ab"}
    assert [r["step"] for r in rows["a"]] == [r["step"] for r in rows["b"]] == [1, 2, 3, 4]
    assert [r["step"] for r in rows["a"] if r["val_loss"] is not None] == [3, 4]
    assert all(r["val_loss"] > 0 and r["loss_smoothed"] > 0 and r["lr"] == 1e-3 for r in rows["b"])
    for ra, rb in zip(rows["a"], rows["b"]):  # the same training stream, the same validation scores
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5) and ra["loss_smoothed"] == pytest.approx(
            rb["loss_smoothed"], rel=1e-5)
        if ra["val_loss"] is not None:
            assert ra["val_loss"] == pytest.approx(rb["val_loss"], rel=1e-5)
    assert not (tmp_path / "b" / "out" / "logs" / "lokr-diffusion").exists()  # no TensorBoard: trackers = []
    for run in "ab":
        with Image.open(tmp_path / run / "out" / "t_loss.png") as chart:
            assert chart.format == "PNG" and chart.size == (960, 540)
    assert f"loss chart: {tmp_path / 'b' / 'out' / 't_loss.png'}" in log


@pytest.mark.slow
def test_two_cpu_processes_sd2_v_prediction(tiny_sd2_path, tmp_path):
    """Data-parallel over gloo, on the v-prediction SD2 model with a zero-terminal-SNR schedule,
    gradient accumulation, an EMA of the adapter and a trigger embedding (half the captions have
    the word: a batch without it must still give the vectors a gradient for DDP to reduce), and
    a validation split whose batches are dealt out to both processes and reduced."""
    cfg = write_config(tmp_path, tiny_sd2_path, train={"max_steps": 2, "gradient_accumulation_steps": 2,
                                                       "zero_terminal_snr": True, "ema_decay": 0.9,
                                                       "min_snr_gamma": 5.0},
                       network={"embedding_trigger": "zqv"},
                       data={"datasets": [{"dir": str(DATASET)}, {"dir": str(DATASET), "caption_prefix": "zqv, "}]},
                       validation={"split": 0.1, "every_steps": 1, "batch_size": 1, "timesteps": [300, 800]})
    log = _ok(launch(cfg, processes=2))
    rows = read_log(tmp_path / "out" / "logs" / "t_loss.csv")
    assert [(r["step"], r["val_loss"] is not None) for r in rows] == [(1, True), (2, True)]
    assert "validation: 4 image(s) held out" in log  # 2 images, each in both datasets
    assert "trigger embedding 'zqv'" in log
    emb = load_file(tmp_path / "out" / "t_emb.safetensors")["emb_params"]
    assert torch.isfinite(emb).all()
    assert "adapter identical on all 2 process(es)" in log
    assert "family sd2-v, prediction v_prediction" in log and "2 process(es)" in log
    sd = load_file(tmp_path / "out" / "t.safetensors")
    assert all(torch.isfinite(v).all() for v in sd.values())


# -- config validation (in-process: the errors come before any model loads) --------------------

def _raw(**over):
    raw = {"model": {"pretrained_model": "x"}, "train": {"max_steps": 1}, "data": {"dir": "d"}}
    for k, v in over.items():
        raw.setdefault(k, {}).update(v)
    return raw


@pytest.mark.parametrize("over,needle", [
    ({"train": {"max_step": 3}}, "train.max_step: unknown key (did you mean 'max_steps'?)"),
    ({"netwrok": {}}, "[netwrok]: unknown section (did you mean [network]?)"),
    ({"train": {"max_steps": -2}}, "train.max_steps: must be at least 1"),
    ({"train": {"learning_rate": "fast"}}, "train.learning_rate: expected float"),
    ({"network": {"factor": 0}}, "network.factor: expected a non-zero integer"),
    ({"network": {"dim": 0}}, "network.dim: expected a positive integer"),
    ({"network": {"algo": "lokrr"}}, "network.algo: 'lokrr' is not one of"),
    ({"train": {"optimizer": "adamw9bit"}}, "did you mean 'adamw8bit'?"),
    ({"train": {"mixed_precision": "fp8"}}, "train.mixed_precision: 'fp8' is not one of"),
    ({"network": {"train_unet": False}}, "nothing to train"),
    ({"sample": {"every_steps": 5}}, "sample.prompts is empty"),
    ({"output": {"save_dtype": "int8"}}, "output.save_dtype"),
    ({"model": {"pretrained_model": ""}}, "model.pretrained_model: required"),
    ({"train": {"prior_loss_weight": 0.0}}, "train.prior_loss_weight: must be positive"),
])
def test_config_errors_name_the_key(over, needle):
    with pytest.raises(ConfigError) as info:
        config_from_dict(_raw(**over))
    assert needle in str(info.value)


def test_prior_loss_weight_scales_each_regularisation_sample():
    from diffusers import DDPMScheduler

    from lokr_diffusion.training.loss import diffusion_loss

    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    timesteps = torch.tensor([10, 200, 500, 900])
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    weights = torch.tensor([1.0, 1.0, 3.0, 3.0])  # two training images, two reg images at weight 3
    scheduler = DDPMScheduler()
    plain = diffusion_loss(pred, target, timesteps, scheduler, "epsilon")
    weighted = diffusion_loss(pred, target, timesteps, scheduler, "epsilon", sample_weights=weights)
    torch.testing.assert_close(plain, per_sample.mean())
    torch.testing.assert_close(weighted, (per_sample * weights).mean())
    assert weighted > plain


def test_prune_removes_old_step_adapters_with_their_embeddings(tmp_path):
    from lokr_diffusion.embeddings import embedding_path
    from lokr_diffusion.training import checkpoint

    for step in (1, 2, 3, None):
        adapter = checkpoint.adapter_path(tmp_path, "t", step)
        adapter.write_bytes(b"adapter")
        embedding_path(adapter).write_bytes(b"embedding")
    checkpoint.prune(tmp_path, "t", keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "t-step000002.safetensors", "t-step000002_emb.safetensors", "t-step000003.safetensors",
        "t-step000003_emb.safetensors", "t.safetensors", "t_emb.safetensors"]


def test_overrides_and_cli_errors(tmp_path, capsys):
    assert parse_override("train.max_steps=7") == (["train", "max_steps"], 7)
    assert parse_override("model.family=sdxl") == (["model", "family"], "sdxl")
    assert parse_override('sample.prompts=["a", "b"]') == (["sample", "prompts"], ["a", "b"])
    cfg_path = write_config(tmp_path, tmp_path / "nomodel")
    cfg = load_config(cfg_path, ["train.max_steps=9", "network.factor=8"])
    assert cfg.train.max_steps == 9 and cfg.network.factor == 8
    assert train_main(["--config", str(cfg_path), "--set", "train.batchsize=2"]) == 2
    err = capsys.readouterr().err
    assert "train.batchsize: unknown key (did you mean 'batch_size'?)" in err and "Traceback" not in err
    assert train_main(["--config", str(tmp_path / "missing.toml")]) == 2
    assert "no such config file" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nmax_steps = 1")
    assert train_main(["--config", str(bad)]) == 2
    assert "not valid TOML" in capsys.readouterr().err

"""Validation loss, the held-out split, the CSV log and the loss chart (in-process, tiny models)."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lokr_diffusion.data import DatasetConfig, build_dataset
from lokr_diffusion.errors import ConfigError, DatasetError
from lokr_diffusion.layers import drop_merged_copies
from lokr_diffusion.training.config import ValidationSection, config_from_dict
from lokr_diffusion.training.logs import COLUMNS, CsvLog, Journal, Smoother, read_log
from lokr_diffusion.training.objective import RectifiedFlow
from lokr_diffusion.training.validation import Validator, validation_dataset, validation_noise

ROOT = Path(__file__).resolve().parent.parent
DATASET = ROOT / "assets" / "example_dataset"
SMALL = dict(resolution=64, min_bucket_reso=64, max_bucket_reso=128, bucket_step=64)


@pytest.fixture
def accelerator():
    """A real single-process CPU Accelerator, its shared state reset afterwards."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    def make(**kwargs):
        return Accelerator(cpu=True, **kwargs)

    yield make
    AcceleratorState._reset_state(reset_partial_state=True)


def _dataset(hold_out=0.0, seed=0, **over):
    configs = [DatasetConfig(dir=DATASET, **{**SMALL, **over})]
    return build_dataset(configs, batch_size=2, seed=1, report=None, verify_images=False, hold_out=hold_out,
                         hold_out_seed=seed)


def test_split_is_deterministic_and_leaves_training():
    full = {str(r.path) for r in _dataset().records}
    a, b, other = _dataset(0.25, seed=3), _dataset(0.25, seed=3), _dataset(0.25, seed=4)
    held = {str(r.path) for r in a.held_out}
    assert held == {str(r.path) for r in b.held_out}
    assert held != {str(r.path) for r in other.held_out}
    assert len(held) == round(0.25 * len(full))
    trained = {str(a.records[i].path) for i in a.samples}
    assert not held & trained and held | trained == full
    # the validation set: one sample per held-out image, no augmentation
    val = validation_dataset(ValidationSection(split=0.25, seed=3), _dataset(0.25, seed=3, flip=True,
                                                                             caption_dropout=0.5), 2, None)
    assert sorted(val[i]["path"] for i in range(len(val))) == sorted(held)
    assert not any(c.flip or c.caption_dropout for c in val.configs)
    # regularisation images are never held out; a share that leaves nothing to train is refused
    reg = build_dataset([DatasetConfig(dir=DATASET, **SMALL), DatasetConfig(dir=DATASET, is_reg=True, **SMALL)],
                        report=None, verify_images=False, hold_out=0.5, hold_out_seed=0)
    assert all(not r.is_reg for r in reg.held_out) and any(r.is_reg for r in reg.records)
    with pytest.raises(DatasetError, match="validation.split"):
        _dataset(0.99)


def test_validation_folder_reads_like_training_data(tmp_path):
    import shutil

    train = _dataset(caption_prefix="zqv, ", flip=True)
    folder = tmp_path / "val" / "10_thing"  # a kohya repeat folder: each image still counts once
    folder.mkdir(parents=True)
    for name in ("shape_00.png", "shape_00.txt", "shape_01.png", "shape_01.txt"):
        shutil.copy(DATASET / name, folder / name)
    val = validation_dataset(ValidationSection(data_dir=str(tmp_path / "val")), train, 4, None)
    assert len(val) == 2 and not val.configs[0].flip
    assert val[0]["caption"].startswith("zqv, ")
    with pytest.raises(DatasetError, match=r"\[validation\] data_dir"):
        validation_dataset(ValidationSection(data_dir=str(tmp_path / "missing")), train, 4, None)


def _restated_loss(unet, text_encoder, encode, scheduler, val, timesteps, seed, gamma):
    """The epsilon loss with min-SNR weights, written out: per image, per timestep."""
    total, n = 0.0, 0
    alphas = scheduler.alphas_cumprod
    for i in range(len(val)):
        item = val[i]
        z = encode(item["pixel_values"][None])
        noise = validation_noise(seed, i, z.shape[1:])[None]
        emb = text_encoder(item["input_ids"][0][None])[0]
        for t in timesteps:
            a = alphas[t]
            noisy = a.sqrt() * z + (1 - a).sqrt() * noise
            pred = unet(noisy, torch.tensor([t]), encoder_hidden_states=emb).sample
            snr = a / (1 - a)
            total += float(F.mse_loss(pred, noise) * torch.clamp(snr, max=gamma) / snr)
            n += 1
    return total / n


def test_validation_loss_equals_restatement(tiny_sd15_path, accelerator):
    from diffusers.training_utils import EMAModel

    from lokr_diffusion.data import VaeLatentEncoder
    from lokr_diffusion.families import family_of_pipeline
    from lokr_diffusion.models import load_pipeline
    from lokr_diffusion.network import AdapterConfig, create_network
    from lokr_diffusion.training.config import TrainSection
    from lokr_diffusion.training.model import TrainingModel
    from lokr_diffusion.training.objective import build_objective

    pipe = load_pipeline(str(tiny_sd15_path))
    family = family_of_pipeline(pipe)
    parts = family.components(pipe)
    unet, te = parts.denoiser, parts.text_encoders[0]
    for m in (unet, te, parts.vae):
        m.requires_grad_(False).eval()
    network = create_network(AdapterConfig(algo="lokr", preset="attn-mlp", factor=4, dim=4, rank_dropout=0.5),
                             unet=unet, family=family)
    with torch.no_grad():  # a non-zero update, so that dropout in train mode would show
        for p in network.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    network.train()
    objective = build_objective(family, pipe, TrainSection(max_steps=1, min_snr_gamma=5.0))
    model = TrainingModel(network, unet, [te], family, False)
    train = _dataset(0.1, seed=2)
    val = validation_dataset(ValidationSection(split=0.1, seed=2), train, 2, None)
    val.set_text(parts.tokenizers)
    encoder = VaeLatentEncoder(parts.vae)
    timesteps = [50, 950]
    acc = accelerator()

    def validator(batch_size, ema=None):
        return Validator(acc, val, batch_size, objective, model, ema, network, encoder, timesteps, seed=7)

    rng = torch.get_rng_state()
    scores = validator(2).evaluate()
    assert torch.equal(torch.get_rng_state(), rng) and network.training  # the training stream and mode untouched
    assert drop_merged_copies(network) == 0  # no merged weight copy is left holding memory
    network.eval()
    with torch.no_grad():
        expected = _restated_loss(unet, te, encoder, objective.scheduler, val, timesteps, 7, 5.0)
    assert drop_merged_copies(network) > 0  # plain no-grad forwards do keep them
    network.train()
    assert math.isclose(scores["val_loss"], expected, rel_tol=1e-5), (scores, expected)
    assert math.isclose(scores["val_loss"], sum(scores[f"val_loss/t{t:03d}"] for t in timesteps) / 2, rel_tol=1e-9)
    assert math.isclose(validator(1).evaluate()["val_loss"], scores["val_loss"], rel_tol=1e-5)  # batch-independent
    # with an EMA, the EMA weights are scored and the live ones restored
    ema = EMAModel(network.parameters(), decay=0.9)
    live = [p.detach().clone() for p in network.parameters()]
    with torch.no_grad():
        for p in network.parameters():
            p.mul_(0.0)
    zeroed = validator(2).evaluate()["val_loss"]
    assert math.isclose(validator(2, ema).evaluate()["val_loss"], scores["val_loss"], rel_tol=1e-5)
    assert zeroed != scores["val_loss"] and all(p.abs().sum() == 0 for p in network.parameters())
    with torch.no_grad():
        for p, v in zip(network.parameters(), live):
            p.copy_(v)
    with pytest.raises(ConfigError, match="validation.timesteps"):
        Validator(acc, val, 2, objective, model, None, network, encoder, [1000], seed=0)


def test_flow_objective_with_fixed_draws_is_the_restated_flow_loss():
    objective = RectifiedFlow(weighting="none", fixed_shift=3.0)
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    weight = torch.randn(4, 4)

    def denoise(noisy, timesteps):
        return torch.einsum("oc,bchw->bohw", weight, noisy) * (timesteps / 1000).view(-1, 1, 1, 1)

    steps = torch.tensor([250, 800])
    rng = torch.get_rng_state()
    loss = objective.loss(latents, denoise, noise=noise, timesteps=steps)
    assert torch.equal(torch.get_rng_state(), rng)  # nothing drawn
    s = torch.tensor([0.25, 0.8]).view(-1, 1, 1, 1)  # unshifted: sigma = t / 1000
    noisy = (1 - s) * latents + s * noise
    expected = ((torch.einsum("oc,bchw->bohw", weight, noisy) * s - (noise - latents)) ** 2).mean()
    torch.testing.assert_close(loss, expected)


def test_csv_log_rows_parse_and_resume_keeps_history(tmp_path, accelerator):
    path = tmp_path / "logs" / "t_loss.csv"
    cfg = config_from_dict({"model": {"pretrained_model": "x"}, "train": {"max_steps": 6}, "data": {"dir": "d"},
                            "logging": {"log_every_steps": 2, "smoothing": 0.5}, "output": {"name": "t"}})
    acc = accelerator(log_with=[CsvLog(path)])
    acc.init_trackers("test")
    journal = Journal(acc, cfg, tmp_path, None, start_step=0, max_steps=6)
    losses = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    for step, loss in enumerate(losses[:4], start=1):
        journal.step(step, loss, 1e-4, torch.tensor(0.5))
    acc.log({"val_loss": 0.75}, step=4)  # a validation-only row
    rows = read_log(path)
    assert path.read_text().splitlines()[0] == ",".join(COLUMNS)
    assert [r["step"] for r in rows] == [2, 4, 4]
    assert rows[0] == {"step": 2, "loss": 0.8, "loss_smoothed": 0.8, "lr": 1e-4, "grad_norm": 0.5, "val_loss": None}
    assert rows[1]["loss_smoothed"] == pytest.approx((0.5 * 0.5 * 0.8 + 0.5 * 0.6) / (1 - 0.25))
    assert rows[2]["val_loss"] == 0.75 and rows[2]["loss"] is None
    with open(path, "a") as f:
        f.write("6,0.3,0.")  # a row cut off by a crash
    assert len(read_log(path)) == 3
    # a resumed run from step 2: later rows go, the smoothed loss goes on from the kept history
    acc.end_training()
    acc = accelerator(log_with=[CsvLog(path)])
    acc.init_trackers("test")
    journal = Journal(acc, cfg, tmp_path, None, start_step=2, max_steps=6)
    assert [r["step"] for r in read_log(path)] == [2]
    for step, loss in enumerate(losses[2:], start=3):
        journal.step(step, loss, 1e-4)
    rows = read_log(path)
    assert [r["step"] for r in rows] == [2, 4, 6]
    smoother = Smoother(0.5)
    assert [r["loss_smoothed"] for r in rows] == [smoother.update(v) for v in (0.8, 0.6, 0.4)]
    chart = journal.finish(6, title="t: loss")
    assert chart == tmp_path / "t_loss.png"
    with Image.open(chart) as image:
        image.verify()
    with Image.open(chart) as image:
        assert image.format == "PNG" and image.size == (960, 540)
        colours = {c for _, c in image.convert("RGB").getcolors(1 << 20)}
    assert (31, 90, 170) in colours  # the smoothed curve is drawn
    acc.end_training()


@pytest.mark.parametrize("over,needle", [
    ({"validation": {"data_dir": "v", "split": 0.1}}, "validation: set data_dir or split, not both"),
    ({"validation": {"every_steps": 5}}, "validation.every_steps is set but there are no validation images"),
    ({"validation": {"split": 1.5}}, "validation.split: must be less than 1"),
    ({"validation": {"split": 0.1, "timesteps": []}}, "validation.timesteps: expected a non-empty list"),
    ({"validation": {"split": 0.1, "timesteps": [100, 1000]}}, "validation.timesteps: expected a non-empty list"),
    ({"logging": {"trackers": ["csv"]}}, "the CSV log (logs/<name>_loss.csv) is always written"),
    ({"logging": {"trackers": ["tensorbaord"]}}, "did you mean 'tensorboard'?"),
])
def test_validation_and_logging_config_errors(over, needle):
    raw = {"model": {"pretrained_model": "x"}, "train": {"max_steps": 1}, "data": {"dir": "d"}, **over}
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert needle in str(info.value)


def test_validation_folder_is_relative_to_the_config(tmp_path):
    raw = {"model": {"pretrained_model": "x"}, "train": {"max_steps": 1}, "data": {"dir": "d"},
           "validation": {"data_dir": "held"}}
    assert config_from_dict(raw, base_dir=tmp_path).validation.data_dir == str(tmp_path / "held")


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_without_the_package_is_a_clear_error():
    raw = {"model": {"pretrained_model": "x"}, "train": {"max_steps": 1}, "data": {"dir": "d"},
           "logging": {"trackers": ["tensorboard", "wandb"]}}
    with pytest.raises(ConfigError, match=r"logging.trackers: 'wandb' needs the wandb package.*lokr-diffusion\[wandb\]"):
        config_from_dict(raw)
    raw["logging"]["tensorboard"] = False
    assert config_from_dict({**raw, "logging": {"trackers": ["tensorboard"], "tensorboard": False}}) \
        .logging.active_trackers == []

"""SD3.5 training through `accelerate launch train.py`: rectified flow with SD3's fixed shift from
its scheduler, the options of the other objective refused, a run that trains all three text
encoders, exact resume from the on-disk text cache, the shipped tiny config, and the adapter
loading back into the StableDiffusion3Pipeline it was trained on."""
from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
from safetensors.torch import load_file

from lokr_diffusion.errors import AdapterFileError, ConfigError
from lokr_diffusion.families import FLUX_DEV, SD35_LARGE
from lokr_diffusion.network import AdapterConfig, create_network
from lokr_diffusion.pipelines import fuse_adapter, list_adapters, load_adapter, unfuse_adapter, unload_adapter
from lokr_diffusion.training.config import config_from_dict
from lokr_diffusion.training.loss import shift_sigmas
from lokr_diffusion.training.objective import RectifiedFlow, build_objective

from .test_train import DATASET, ROOT, _ok, launch, ok_here, train_here, write_config

SD3_TRAIN = {"max_steps": 3, "batch_size": 2, "learning_rate": 1e-3, "seed": 1}
TINY_ATTN_MLP = {"unet": 21, "te1": 12, "te2": 12, "te3": 14}  # 2 blocks (12 + 9), 2 CLIP layers x 6, 2 T5 x 7


def _sd3_config(tmp_path, model, **sections):
    sections["train"] = {**SD3_TRAIN, **sections.get("train", {})}
    return write_config(tmp_path, model, **sections)


def _pipeline(path):
    pipe = StableDiffusion3Pipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        m.requires_grad_(False).eval()
    return pipe


def _train_cfg(**train):
    return config_from_dict({"model": {"pretrained_model": "x"}, "data": {"datasets": [{"dir": str(DATASET)}]},
                             "train": {"max_steps": 1, **train}}).train


def _weights(pipe):
    models = {"transformer": pipe.transformer, "te1": pipe.text_encoder, "te2": pipe.text_encoder_2,
              "te3": pipe.text_encoder_3}
    return {f"{n}.{k}": v.clone() for n, m in models.items() for k, v in m.state_dict().items()}


# -- the objective: SD3's fixed shift, restated --------------------------------------------------------

def test_fixed_shift_from_the_scheduler(tiny_sd3_path):
    """SD3 samples and trains with shift 3.0 at every resolution (no dynamic shifting); the shifted
    positions equal FlowMatchEulerDiscreteScheduler's sigmas, and a step feeds s * 1000."""
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_path))
    objective = build_objective(SD35_LARGE, pipe, _train_cfg())
    assert isinstance(objective, RectifiedFlow) and objective.dynamic is None and objective.fixed_shift == 3.0
    assert objective.shift_for(torch.zeros(1, 16, 8, 8)) == objective.shift_for(torch.zeros(1, 16, 128, 128)) == 3.0
    assert objective.describe() == "rectified flow (logit_normal timesteps, shift 3, loss weighting none)"
    scheduler = FlowMatchEulerDiscreteScheduler(**SD35_LARGE.scheduler_config)
    n = scheduler.config.num_train_timesteps
    torch.testing.assert_close(shift_sigmas(torch.arange(n, 0, -1, dtype=torch.float32) / n, 3.0), scheduler.sigmas)
    assert build_objective(SD35_LARGE, pipe, _train_cfg(shift=1.0)).shift_for(torch.zeros(1, 16, 8, 8)) == 1.0

    latents = torch.randn(3, 16, 4, 6)
    seen = {}

    def denoise(noisy, timesteps):
        seen["noisy"], seen["t"] = noisy, timesteps
        return torch.zeros_like(noisy)

    torch.manual_seed(3)
    loss = objective.loss(latents, denoise)
    torch.manual_seed(3)
    noise = torch.randn_like(latents)
    u = torch.sigmoid(torch.randn(3))
    s = 3.0 * u / (1 + 2.0 * u)
    torch.testing.assert_close(seen["t"], s * 1000)
    torch.testing.assert_close(seen["noisy"], (1 - s.view(-1, 1, 1, 1)) * latents + s.view(-1, 1, 1, 1) * noise)
    torch.testing.assert_close(loss, ((noise - latents) ** 2).mean())


@pytest.mark.parametrize("key,value", [("min_snr_gamma", 5.0), ("zero_terminal_snr", True), ("min_timestep", 100)])
def test_noise_options_refused_on_sd3(tiny_sd3_path, key, value):
    pipe = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd3_path))
    with pytest.raises(ConfigError, match=rf"train\.{key}: not available for SD3\.5 Large.*flow matching"):
        build_objective(SD35_LARGE, pipe, _train_cfg(**{key: value}))


# -- training runs ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sd3_end_to_end_with_every_text_encoder(tiny_sd3_path, tmp_path):
    """The transformer and all three text encoders (T5 named in text_encoders) train, a checkpoint
    at step 2, a sample grid from StableDiffusion3Pipeline; the file loads back with load_adapter
    into the pipeline, every module matched, and unloads bit-exactly."""
    cfg = _sd3_config(tmp_path, tiny_sd3_path,
                      network={"train_text_encoder": True, "text_encoders": ["te1", "te2", "te3"]},
                      train={"timestep_sampling": "mode"}, output={"save_every_steps": 2},
                      sample={"prompts": ["a red circle"], "steps": 2, "num_images": 1, "guidance_scale": 4.5,
                              "width": 64, "height": 64})
    log = _ok(launch(cfg))
    assert "family sd35-large, rectified flow (mode timesteps, shift 3, loss weighting none), 59 modules" in log
    out = tmp_path / "out"
    assert (out / "t-step000002.safetensors").exists()
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step000003-00-a-red-circle.png"]
    sd = load_file(out / "t.safetensors")
    modules = {k.rsplit(".", 1)[0] for k in sd}
    for prefix in ("lycoris_transformer_blocks_", "lora_te1_text_model_", "lora_te2_text_model_",
                   "lora_te3_encoder_block_"):
        assert any(m.startswith(prefix) for m in modules), prefix
    assert any(v.abs().sum() > 0 for k, v in sd.items() if k.endswith("lokr_w1"))
    pipe = _pipeline(tiny_sd3_path)
    before = _weights(pipe)
    report = load_adapter(pipe, out / "t.safetensors", adapter_name="trained", strict=True)
    assert report.patched == TINY_ATTN_MLP and not report.unmatched
    fuse_adapter(pipe)
    changed = {k.split(".")[0] for k, v in before.items() if not torch.equal(_weights(pipe)[k], v)}
    assert changed == {"transformer", "te1", "te2", "te3"}
    unload_adapter(pipe)
    after = _weights(pipe)
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.slow
def test_sd3_exact_resume(tiny_sd3_path, tmp_path, capsys):
    """Stop after 2 of 4 steps, resume: the adapter equals a 4-step run's (text encoders frozen:
    the three encoders' embeddings come from the on-disk text cache both times)."""
    common = dict(network={"train_text_encoder": False}, train={"max_steps": 4, "timestep_sampling": "logit_normal"},
                  output={"save_every_steps": 2})
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ok_here(capsys, _sd3_config(tmp_path / "a", tiny_sd3_path, **common))
    part = _sd3_config(tmp_path / "b", tiny_sd3_path, **common)
    ok_here(capsys, part, "--set", "train.max_steps=2")
    log = ok_here(capsys, part, "--set", "train.resume=latest")
    assert "resumed from" in log and "step-000002" in log
    assert list((tmp_path / "b" / "out" / "cache").rglob("*.safetensors"))  # the text cache is on disk
    a, b = load_file(tmp_path / "a" / "out" / "t.safetensors"), load_file(tmp_path / "b" / "out" / "t.safetensors")
    assert a.keys() == b.keys() and all(k.startswith("lycoris_") for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


@pytest.mark.slow
def test_shipped_tiny_sd3_config_trains(tiny_sd3_path, tmp_path, capsys):
    """train_configs/sd3_tiny.toml as shipped, with its model and output folders moved to tmp."""
    config = ROOT / "train_configs" / "sd3_tiny.toml"
    log = ok_here(capsys, config, "--set", f"model.pretrained_model={str(tiny_sd3_path)!r}",
                  "--set", f"output.dir={str(tmp_path / 'out')!r}", "--set", "train.max_steps=2",
                  "--set", "output.save_every_steps=1")
    assert "family sd35-large, rectified flow (logit_normal timesteps, shift 3" in log
    sd = load_file(tmp_path / "out" / "sd3_tiny_lokr.safetensors")
    assert {k.split("_")[0] + "_" + k.split("_")[1] for k in sd} == {"lycoris_transformer", "lora_te1", "lora_te2"}
    assert len(list((tmp_path / "out" / "samples").glob("*.png"))) == 1


def test_unknown_text_encoder_prefix_is_refused(tiny_sd3_path, tmp_path, capsys):
    cfg = _sd3_config(tmp_path, tiny_sd3_path, network={"train_text_encoder": True, "text_encoders": ["te4"]})
    code, log = train_here(capsys, cfg)
    assert code == 2
    assert "network.text_encoders: 'te4' is no text encoder of SD3.5 Large; expected some of te1, te2, te3" in log


# -- the pipeline API on StableDiffusion3Pipeline --------------------------------------------------

def _sd3_adapter(pipe, path, seed=0):
    """A LoKr file with random (non-zero) factors on the transformer and the three text encoders."""
    net = create_network(AdapterConfig(algo="lokr", preset="attn-mlp", factor=4, dim=4), unet=pipe.transformer,
                         text_encoders=[pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3],
                         family=SD35_LARGE)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    net.save(path, dtype=torch.float32)
    net.remove()
    return path


def test_sd3_pipeline_load_fuse_unfuse_unload(tiny_sd3_path, tmp_path):
    pipe = _pipeline(tiny_sd3_path)
    before = _weights(pipe)
    report = load_adapter(pipe, _sd3_adapter(pipe, tmp_path / "a.safetensors"), adapter_name="a", strict=True)
    assert report.patched == TINY_ATTN_MLP
    assert list(list_adapters(pipe)) == ["a"]
    with torch.no_grad():
        image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="pt",
                     generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
    fuse_adapter(pipe)
    fused = _weights(pipe)
    assert {k.split(".")[0] for k, v in before.items() if not torch.equal(fused[k], v)} == \
        {"transformer", "te1", "te2", "te3"}
    unfuse_adapter(pipe)
    unload_adapter(pipe)
    after = _weights(pipe)
    assert all(torch.equal(after[k], v) for k, v in before.items())  # bit-exact


def test_sd3_and_flux_files_are_refused_on_each_others_pipelines(tiny_sd3_path, tiny_flux_path, tmp_path):
    from .test_flux_train import _flux_adapter

    sd3 = _pipeline(tiny_sd3_path)
    flux = FluxPipeline.from_pretrained(str(tiny_flux_path))
    sd3_file = _sd3_adapter(sd3, tmp_path / "sd3.safetensors")
    flux_file = _flux_adapter(flux, tmp_path / "flux.safetensors")
    with pytest.raises(AdapterFileError, match=r"sd3\.safetensors: the file is for SD3\.5 Large or SD3\.5 Medium, "
                                               r"but the model is Flux\.1 \[dev\]"):
        load_adapter(flux, sd3_file)
    with pytest.raises(AdapterFileError, match=r"flux\.safetensors: the file is for Flux\.1.*but the model is SD3\.5"):
        load_adapter(sd3, flux_file)
    assert FLUX_DEV.attention_width != SD35_LARGE.attention_width

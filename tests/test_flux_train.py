"""Flux.1 training through `accelerate launch train.py`: the rectified-flow objective, the
options that belong to the other objective refused, resume, two processes, and the adapter
loading back into the pipeline it was trained on."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from safetensors.torch import load_file

from lokr_diffusion import load_network
from lokr_diffusion.errors import ConfigError
from lokr_diffusion.families.flux import FLUX_DEV
from lokr_diffusion.training.config import config_from_dict
from lokr_diffusion.training.logs import read_log
from lokr_diffusion.training.loss import flow_matching_loss, shift_sigmas
from lokr_diffusion.training.objective import RectifiedFlow, build_objective

from .test_train import DATASET, _ok, launch, ok_here, train_here, write_config

FLUX_TRAIN = {"max_steps": 3, "batch_size": 2, "learning_rate": 1e-3, "seed": 1}


def _flux_config(tmp_path, model, **sections):
    sections["train"] = {**FLUX_TRAIN, **sections.get("train", {})}
    return write_config(tmp_path, model, **sections)


def _pipeline_parts(path):
    pipe = FluxPipeline.from_pretrained(str(path))
    for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2):
        m.requires_grad_(False).eval()
    return pipe


# -- the objective, restated ------------------------------------------------------------------------

def test_flow_matching_loss_restated():
    """x_s = (1 - s) x0 + s e, target e - x0, timesteps s * 1000; s drawn (after the noise) from
    the density and shifted."""
    latents = torch.randn(3, 16, 4, 6)
    seen = {}

    def denoise(noisy, timesteps):
        seen["noisy"], seen["t"] = noisy, timesteps
        return torch.zeros_like(noisy)

    torch.manual_seed(7)
    loss = flow_matching_loss(latents, denoise, 3.0, sampling="logit_normal", logit_mean=0.5, logit_std=0.8)
    torch.manual_seed(7)
    noise = torch.randn_like(latents)
    u = torch.sigmoid(torch.normal(0.5, 0.8, size=(3,)))
    s = 3.0 * u / (1 + 2.0 * u)
    torch.testing.assert_close(seen["t"], s * 1000)
    torch.testing.assert_close(seen["noisy"], (1 - s.view(-1, 1, 1, 1)) * latents + s.view(-1, 1, 1, 1) * noise)
    torch.testing.assert_close(loss, ((noise - latents) ** 2).mean())


def test_cosmap_density_and_weighting():
    """CosMap positions t = 1 - 1 / (tan(pi u / 2) + 1) and the CosMap loss weight per sample."""
    latents = torch.randn(4, 16, 2, 2)
    seen = {}

    def denoise(noisy, timesteps):
        seen["t"] = timesteps
        return torch.zeros_like(noisy)

    torch.manual_seed(0)
    loss = flow_matching_loss(latents, denoise, 1.0, sampling="cosmap", weighting="cosmap")
    torch.manual_seed(0)
    noise = torch.randn_like(latents)
    s = 1 - 1 / (torch.tan(math.pi * torch.rand(4) / 2) + 1)
    torch.testing.assert_close(seen["t"], s * 1000)
    weight = 2 / (math.pi * (1 - 2 * s + 2 * s ** 2))
    torch.testing.assert_close(loss, (((noise - latents) ** 2).mean(dim=(1, 2, 3)) * weight).mean())


def test_resolution_dependent_shift_equals_the_schedulers():
    """Flux's shift: mu from the packed token count between base and max shift; the sigma it
    gives equals FlowMatchEulerDiscreteScheduler's exponential time shift."""
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV.scheduler_config)
    objective = RectifiedFlow(dynamic=(256, 4096, 0.5, 1.15), tokens=FLUX_DEV.image_tokens)
    latents = torch.zeros(1, 16, 128, 128)  # 1024 px: 4096 tokens, mu = max_shift
    shift = objective.shift_for(latents)
    assert shift == pytest.approx(math.exp(1.15))
    t = torch.linspace(0.05, 0.95, 7)
    torch.testing.assert_close(shift_sigmas(t, shift), scheduler.time_shift(1.15, 1.0, t))
    assert objective.shift_for(torch.zeros(1, 16, 32, 32)) == pytest.approx(math.exp(0.5))  # 256 tokens


@pytest.mark.parametrize("key,value,needle", [
    ("min_snr_gamma", 5.0, "signal-to-noise"),
    ("zero_terminal_snr", True, "DDPM beta schedule"),
    ("max_timestep", 500, r"positions in \[0, 1\]"),
])
def test_noise_options_refused_on_flux(tiny_flux_path, key, value, needle):
    pipe = FluxPipeline.from_pretrained(str(tiny_flux_path))
    cfg = config_from_dict({"model": {"pretrained_model": "x"}, "data": {"datasets": [{"dir": str(DATASET)}]},
                            "train": {"max_steps": 1, key: value}})
    with pytest.raises(ConfigError, match=rf"train\.{key}: not available for Flux.1 \[dev\].*{needle}"):
        build_objective(FLUX_DEV, pipe, cfg.train)


def test_flow_options_refused_on_sd(tiny_sd15_path):
    from diffusers import StableDiffusionPipeline

    from lokr_diffusion.families import SD1

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd15_path))
    cfg = config_from_dict({"model": {"pretrained_model": "x"}, "data": {"datasets": [{"dir": str(DATASET)}]},
                            "train": {"max_steps": 1, "timestep_sampling": "mode"}})
    with pytest.raises(ConfigError, match=r"train\.timestep_sampling: a flow-matching option"):
        build_objective(SD1, pipe, cfg.train)


# -- training runs ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_flux_end_to_end(tiny_flux_path, tmp_path):
    """CLIP-L trains with the transformer (T5 stays frozen by default), a checkpoint at step 2,
    a sample grid from FluxPipeline; the file loads back with every module matched. Validation
    reads a folder (the training images again), at step 2 and at the end."""
    cfg = _flux_config(tmp_path, tiny_flux_path, network={"train_text_encoder": True},
                       train={"timestep_sampling": "mode", "guidance": 3.5}, output={"save_every_steps": 2},
                       sample={"prompts": ["a red circle"], "steps": 2, "num_images": 1, "guidance_scale": 3.5,
                               "width": 64, "height": 64},
                       validation={"data_dir": str(DATASET), "every_steps": 2, "batch_size": 4, "timesteps": [500]})
    log = _ok(launch(cfg))
    rows = read_log(tmp_path / "out" / "logs" / "t_loss.csv")
    assert [r["step"] for r in rows if r["val_loss"] is not None] == [2, 3]
    assert all(math.isfinite(r["val_loss"]) and r["val_loss"] > 0 for r in rows if r["val_loss"] is not None)
    assert "family flux, rectified flow (mode timesteps, resolution-dependent shift" in log
    out = tmp_path / "out"
    assert (out / "t-step000002.safetensors").exists()
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == ["step000003-00-a-red-circle.png"]
    sd = load_file(out / "t.safetensors")
    modules = {k.rsplit(".", 1)[0] for k in sd}
    assert {m.split("_")[0] for m in modules} == {"lycoris", "lora"}
    assert any(m.startswith("lycoris_single_transformer_blocks_") for m in modules)
    assert any(m.startswith("lora_te1_text_model_") for m in modules)
    assert not any(m.startswith("lora_te2_") for m in modules)  # T5 frozen unless asked
    assert any(v.abs().sum() > 0 for k, v in sd.items() if k.endswith("lokr_w1"))
    pipe = _pipeline_parts(tiny_flux_path)
    net, report = load_network(out / "t.safetensors", unet=pipe.transformer,
                               text_encoders=[pipe.text_encoder, pipe.text_encoder_2], strict=True)
    assert report.patched == {"unet": 34, "te1": 12}  # attn-mlp: 2 double x 12 + 2 single x 5; CLIP 2 x 6
    net.remove()


@pytest.mark.slow
def test_flux_exact_resume(tiny_flux_path, tmp_path, capsys):
    """Stop after 2 of 4 steps, resume: the adapter equals a 4-step run's (the T5 embeddings come
    from the on-disk text cache both times)."""
    common = dict(train={"max_steps": 4, "timestep_sampling": "logit_normal", "shift": 3.0},
                  output={"save_every_steps": 2})
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ok_here(capsys, _flux_config(tmp_path / "a", tiny_flux_path, **common))
    part = _flux_config(tmp_path / "b", tiny_flux_path, **common)
    ok_here(capsys, part, "--set", "train.max_steps=2")
    log = ok_here(capsys, part, "--set", "train.resume=latest")
    assert "resumed from" in log and "step-000002" in log
    assert list((tmp_path / "b" / "out" / "cache").rglob("*.safetensors"))  # the text cache is on disk
    a, b = load_file(tmp_path / "a" / "out" / "t.safetensors"), load_file(tmp_path / "b" / "out" / "t.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


@pytest.mark.slow
def test_flux_two_cpu_processes_with_t5(tiny_flux_path, tmp_path):
    """Data-parallel over gloo with both text encoders trained (te2 is T5: no text cache)."""
    cfg = _flux_config(tmp_path, tiny_flux_path, network={"train_text_encoder": True, "text_encoders": ["te1", "te2"]},
                       train={"max_steps": 2, "gradient_accumulation_steps": 2})
    log = _ok(launch(cfg, processes=2))
    assert "adapter identical on all 2 process(es)" in log
    sd = load_file(tmp_path / "out" / "t.safetensors")
    assert any(k.startswith("lora_te2_encoder_block_0_layer_0_SelfAttention_q.") for k in sd)
    assert all(torch.isfinite(v).all() for v in sd.values())


def test_unknown_text_encoder_prefix_is_refused(tiny_flux_path, tmp_path, capsys):
    cfg = _flux_config(tmp_path, tiny_flux_path, network={"train_text_encoder": True, "text_encoders": ["te3"]})
    code, log = train_here(capsys, cfg)
    assert code == 2
    assert "network.text_encoders: 'te3' is no text encoder of Flux.1 [dev]; expected some of te1, te2" in log


# -- the pipeline API on FluxPipeline --------------------------------------------------------------

def _flux_adapter(pipe, path, seed=0):
    """A LoKr file with random (non-zero) factors on the transformer and both text encoders."""
    from lokr_diffusion.network import AdapterConfig, create_network

    net = create_network(AdapterConfig(algo="lokr", preset="attn-mlp", factor=4, dim=4),
                         unet=pipe.transformer, text_encoders=[pipe.text_encoder, pipe.text_encoder_2], family=FLUX_DEV)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    net.save(path, dtype=torch.float32)
    net.remove()
    return path


def test_flux_pipeline_load_fuse_unfuse_unload(tiny_flux_path, tmp_path):
    from lokr_diffusion.pipelines import fuse_adapter, list_adapters, load_adapter, unfuse_adapter, unload_adapter

    pipe = _pipeline_parts(tiny_flux_path)
    models = {"transformer": pipe.transformer, "te1": pipe.text_encoder, "te2": pipe.text_encoder_2}

    def weights():
        return {f"{n}.{k}": v.clone() for n, m in models.items() for k, v in m.state_dict().items()}

    before = weights()
    report = load_adapter(pipe, _flux_adapter(pipe, tmp_path / "a.safetensors"), adapter_name="a", strict=True)
    assert report.patched == {"unet": 34, "te1": 12, "te2": 14}  # T5 attn-mlp: 2 layers x (q, k, v, o, wi_0, wi_1, wo)
    assert list(list_adapters(pipe)) == ["a"]
    fuse_adapter(pipe)
    fused = weights()
    changed = {k.split(".")[0] for k, v in before.items() if not torch.equal(fused[k], v)}
    assert changed == {"transformer", "te1", "te2"}
    unfuse_adapter(pipe)
    unload_adapter(pipe)
    after = weights()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # bit-exact


def test_flux_file_on_sd_pipeline_and_back_are_clear_errors(tiny_flux_path, tiny_sd15_path, tmp_path):
    from diffusers import StableDiffusionPipeline

    from lokr_diffusion.errors import AdapterFileError
    from lokr_diffusion.network import AdapterConfig, create_network
    from lokr_diffusion.pipelines import load_adapter

    flux = _pipeline_parts(tiny_flux_path)
    sd = StableDiffusionPipeline.from_pretrained(str(tiny_sd15_path))
    flux_file = _flux_adapter(flux, tmp_path / "flux.safetensors")
    net = create_network(AdapterConfig(), unet=sd.unet, text_encoders=[sd.text_encoder])
    sd_file = net.save(tmp_path / "sd.safetensors")
    net.remove()
    with pytest.raises(AdapterFileError, match=r"flux\.safetensors: the file is for Flux\.1.*but the model is SD 1\.x"):
        load_adapter(sd, flux_file)
    with pytest.raises(AdapterFileError, match=r"sd\.safetensors: the file is for SD 1\.x.*but the model is Flux\.1"):
        load_adapter(flux, sd_file)


@pytest.mark.slow
def test_shipped_tiny_flux_config_trains(tiny_flux_path, tmp_path, capsys):
    """train_configs/flux_tiny.toml as shipped, with its model and output folders moved to tmp."""
    from .test_train import ROOT

    config = ROOT / "train_configs" / "flux_tiny.toml"
    log = ok_here(capsys, config, "--set", f"model.pretrained_model={str(tiny_flux_path)!r}",
                  "--set", f"output.dir={str(tmp_path / 'out')!r}", "--set", "train.max_steps=2",
                  "--set", "output.save_every_steps=1")
    assert "family flux, rectified flow" in log
    assert (tmp_path / "out" / "flux_tiny_lokr.safetensors").exists()
    assert len(list((tmp_path / "out" / "samples").glob("*.png"))) == 1

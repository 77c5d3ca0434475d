"""CUDA paths: fp16/bf16 pipelines with loaded adapters, mixed-precision training, xformers.
Skipped without a GPU (CI has none); run on a GPU machine with `python -m pytest -m gpu`."""
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from lokr_diffusion import AdapterConfig, create_network, load_adapter, unload_adapter  # noqa: E402
from lokr_diffusion.algos import lokr  # noqa: E402
from lokr_diffusion.algos.common import ModuleSettings, apply_weight  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pipeline_with_adapter_in_half_precision(tiny_sd15_path, tmp_path, dtype):
    from diffusers import StableDiffusionPipeline

    ref = StableDiffusionPipeline.from_pretrained(tiny_sd15_path, safety_checker=None).to("cuda")
    net = create_network(AdapterConfig(preset="full", factor=4, dim=4, conv_dim=4), unet=ref.unet,
                         text_encoders=[ref.text_encoder])
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    path = net.save(tmp_path / "a.safetensors")
    net.remove()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_path, safety_checker=None, torch_dtype=dtype).to("cuda")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    run = lambda p: p("a red circle", num_inference_steps=2, height=64, width=64, output_type="np",  # noqa: E731
                      generator=torch.Generator("cuda").manual_seed(0)).images
    base = run(pipe)
    load_adapter(pipe, path)
    load_adapter(ref, path)
    got, want = run(pipe), run(ref)
    assert abs(got - base).max() > 1e-3
    assert abs(got - want).max() < 0.05, abs(got - want).max()  # half-precision UNet vs fp32
    unload_adapter(pipe)
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_factored_path_in_half_precision(dtype):
    torch.manual_seed(0)
    for base, shape in [(torch.nn.Linear(640, 640), (2, 77, 640)), (torch.nn.Conv2d(320, 640, 3, padding=1), (2, 320, 16, 16))]:
        base = base.cuda()
        t = {k: torch.randn_like(v).cuda() * 0.1 for k, v in lokr.init_tensors(tuple(base.weight.shape), ModuleSettings(4, 1, 8)).items()}
        x = torch.randn(shape, device="cuda")
        ref = apply_weight(x, lokr.delta_weight(t, tuple(base.weight.shape)), base)
        with torch.autocast("cuda", dtype=dtype):
            fast = lokr.forward(x, t, base)
        assert fast is not None and fast.dtype == dtype
        rel = ((fast.float() - ref).norm() / ref.norm()).item()
        assert rel < 2e-2, rel


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_training(tiny_sd15_path, tmp_path, precision):
    from safetensors.torch import load_file

    from .test_train import ROOT, write_config
    cfg = write_config(tmp_path, tiny_sd15_path, train={"max_steps": 3, "mixed_precision": precision, "xformers": True,
                                                        "gradient_checkpointing": True},
                       sample={"prompts": ["a red circle"], "every_steps": 3, "steps": 2, "num_images": 1,
                               "width": 64, "height": 64})
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(cfg)], env=env, capture_output=True,
                       text=True, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "CUDA allocated" in log
    sd = load_file(tmp_path / "out" / "t.safetensors")
    assert all(torch.isfinite(v).all() for v in sd.values())
    assert (tmp_path / "out" / "samples").exists()
    try:
        import xformers  # noqa: F401
    except ImportError:
        assert "xformers requested but unavailable" in log

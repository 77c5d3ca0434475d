"""The trainer with `[train] compile`, `[model] base_dtype` and gradient checkpointing on the tiny
models, in this process (the end-to-end tests cover `accelerate launch` itself)."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lokr_diffusion.errors import ConfigError
from lokr_diffusion.training.config import config_from_dict

from .test_train import ok_here, write_config

SAMPLE = {"prompts": ["a red circle"], "every_steps": 2, "steps": 2, "num_images": 1, "width": 64, "height": 64}


@pytest.mark.slow
def test_compiled_flux_trains_samples_and_saves(tiny_flux_path, tmp_path, capsys):
    """compile_backend "aot_eager": the same graph capture as inductor without generating C++
    (inductor compiles for minutes on this CPU; the tiny UNets take Dynamo minutes too, so the
    suite compiles the tiny Flux transformer). In this process, Dynamo's caches reset around it."""
    cfg = write_config(tmp_path, tiny_flux_path, train={"max_steps": 3, "compile": True, "compile_backend": "aot_eager"},
                       output={"save_every_steps": 2}, sample=SAMPLE)
    torch._dynamo.reset()
    try:
        log = ok_here(capsys, cfg)
    finally:
        torch._dynamo.reset()
    out = tmp_path / "out"
    assert "denoiser compiled (backend aot_eager)" in log
    assert (out / "t.safetensors").exists() and (out / "t-step000002.safetensors").exists()
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == [
        "step000002-00-a-red-circle.png", "step000003-00-a-red-circle.png"]
    sd = load_file(out / "t.safetensors")
    assert all(torch.isfinite(v).all() for v in sd.values())
    assert any(v.abs().sum() > 0 for k, v in sd.items() if "lokr_w2" in k)


def _format(path):
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        shapes = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    return shapes, sorted(k for k in meta if not k.startswith("ss_training_started") and "hash" not in k)


@pytest.mark.slow
def test_flux_fp8_and_bf16_bases_train_and_save_the_same_format(tiny_flux_path, tmp_path, capsys):
    """fp8 (with gradient checkpointing on the DiT blocks) and bf16 stored bases, fp32 compute:
    both train and write the same tensors, shapes, dtypes and metadata keys as an fp32 base."""
    files, logs = {}, {}
    for base, extra in (("fp8", {"gradient_checkpointing": True}), ("bf16", {}), ("fp32", {})):
        run = tmp_path / base
        run.mkdir()
        cfg = write_config(run, tiny_flux_path, train={"max_steps": 2, **extra}, sample={**SAMPLE, "every_steps": 2})
        cfg.write_text(cfg.read_text().replace("[model]\n", f'[model]\nbase_dtype = "{base}"\n', 1))
        logs[base] = ok_here(capsys, cfg)
        files[base] = run / "out" / "t.safetensors"
    assert "layers stored in fp8" in logs["fp8"] and "layers stored in bf16" in logs["bf16"]
    assert _format(files["fp8"]) == _format(files["bf16"]) == _format(files["fp32"])
    for base in ("fp8", "bf16"):
        sd = load_file(files[base])
        assert all(torch.isfinite(v).all() for v in sd.values())
        assert any(v.abs().sum() > 0 for k, v in sd.items() if "lokr_w2" in k), base
        assert (tmp_path / base / "out" / "samples" / "step000002-00-a-red-circle.png").exists()


def test_compile_config_refusals():
    base = {"model": {"pretrained_model": "x"}, "train": {"max_steps": 1, "compile": True},
            "data": {"datasets": [{"dir": "."}]}}
    with pytest.raises(ConfigError, match="train.compile and train.xformers"):
        config_from_dict({**base, "train": {**base["train"], "xformers": True}})
    with pytest.raises(ConfigError, match="inductor mode"):
        config_from_dict({**base, "train": {**base["train"], "compile_backend": "aot_eager",
                                            "compile_mode": "max-autotune"}})
    with pytest.raises(ConfigError, match="model.base_dtype"):
        config_from_dict({**base, "model": {**base["model"], "base_dtype": "int4"}})


def test_compile_in_place_turns_layout_optimisation_off_on_the_cpu():
    """The trainer's and the benchmark's compile call: on a CPU the inductor mode is passed as its
    options plus layout_optimization = False; other backends get no inductor options. The module
    itself stays the same object (only its calls are compiled, lazily)."""
    from lokr_diffusion.training.compilation import compile_in_place

    model = torch.nn.Conv2d(4, 4, 1)
    assert compile_in_place(model, "inductor", "default") == {
        "backend": "inductor", "options": {"layout_optimization": False}}
    args = compile_in_place(torch.nn.Linear(2, 2), "inductor", "max-autotune-no-cudagraphs")
    assert args["options"] == {"max_autotune": True, "coordinate_descent_tuning": True, "layout_optimization": False}
    assert compile_in_place(torch.nn.Linear(2, 2), "aot_eager", "default") == {"backend": "aot_eager"}
    assert model._compiled_call_impl is not None

"""`lokr-diffusion merge`: the merged model equals the base with the adapters loaded."""
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
from safetensors.torch import load_file

from lokr_diffusion import fuse_adapter, load_adapter

from .helpers import load_components
from .test_tools_helpers import make_adapter, run_cli, run_json

SD_KW = {"safety_checker": None, "requires_safety_checker": False}


@pytest.fixture(scope="module")
def sd15_adapters(tiny_sd15_path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("merge")
    unet, tes = load_components(tiny_sd15_path)
    a, b = folder / "a.safetensors", folder / "b.safetensors"
    make_adapter(unet, tes, a, seed=1, algo="lokr", preset="full", factor=4, dim=2, conv_dim=2)
    make_adapter(unet, tes, b, seed=2, algo="loha", preset="attn-mlp", dim=2, alpha=1.0, weight_decompose=True)
    return a, b


def _reference(path, cls, adapters, **kw):
    """The base with load_adapter + fuse_adapter: what the merged weights must equal."""
    pipe = cls.from_pretrained(path, **kw)
    for i, (file, scale) in enumerate(adapters):
        load_adapter(pipe, file, scale=scale, adapter_name=f"a{i}")
    return pipe


def _assert_same(model, reference, tol):
    got, want = model.state_dict(), reference.state_dict()
    assert set(got) == set(want)
    worst = max(float((got[k].float() - want[k].float()).abs().max()) for k in want)
    assert worst <= tol, worst


def test_folder_equals_loaded_adapters(capsys, tiny_sd15_path, sd15_adapters, tmp_path):
    """b is a DoRA file: merged after a, it normalises the weight a left, as when both are loaded."""
    a, b = sd15_adapters
    out = tmp_path / "merged"
    r = run_json(capsys, "merge", "--base", tiny_sd15_path, "--adapter", f"{a}:0.7", "--adapter", b, "--out", out)
    assert r["adapters"][0]["scale"] == 0.7 and r["adapters"][1]["scale"] == 1.0
    assert r["adapters"][0]["modules"] == {"unet": 282, "te": 12}
    merged = StableDiffusionPipeline.from_pretrained(out, **SD_KW)
    ref = _reference(tiny_sd15_path, StableDiffusionPipeline, [(a, 0.7), (b, 1.0)], **SD_KW)
    # outputs: merged weights vs the hooked (unfused) adapters
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32)
    ids = torch.tensor([[0, 5, 9, 2]])
    with torch.no_grad():
        assert torch.allclose(merged.unet(x, 3, encoder_hidden_states=ctx).sample,
                              ref.unet(x, 3, encoder_hidden_states=ctx).sample, atol=1e-4)
        assert torch.allclose(merged.text_encoder(ids)[0], ref.text_encoder(ids)[0], atol=1e-4)
    fuse_adapter(ref)
    for name in ("unet", "text_encoder", "vae"):
        _assert_same(getattr(merged, name), getattr(ref, name), 1e-6)
    assert not list(tmp_path.glob(".*"))  # no temporary folder left behind


def test_single_file_loads_back_with_from_single_file(capsys, tiny_sd15_path, sd15_adapters, tmp_path):
    a, _ = sd15_adapters
    out = tmp_path / "merged.safetensors"
    r = run_json(capsys, "merge", "--base", tiny_sd15_path, "--adapter", f"{a}:0.5", "--out", out)
    assert r["layout"].startswith("single-file")
    keys = load_file(out)
    assert any(k.startswith("model.diffusion_model.input_blocks.1.1.") for k in keys)
    assert any(k.startswith("first_stage_model.encoder.down.0.block.0.") for k in keys)
    assert any(k.startswith("cond_stage_model.transformer.text_model.encoder.layers.0.") for k in keys)
    loaded = StableDiffusionPipeline.from_single_file(str(out), config=str(tiny_sd15_path), local_files_only=True,
                                                      **SD_KW)
    ref = _reference(tiny_sd15_path, StableDiffusionPipeline, [(a, 0.5)], **SD_KW)
    fuse_adapter(ref)
    for name in ("unet", "text_encoder", "vae"):
        _assert_same(getattr(loaded, name), getattr(ref, name), 1e-6)


def test_sdxl_single_file_fp16(capsys, tiny_sdxl_path, tmp_path):
    unet, tes = load_components(tiny_sdxl_path)
    adapter = tmp_path / "xl.safetensors"
    make_adapter(unet, tes, adapter, seed=3, algo="lokr", preset="full", factor=-1, dim=4, conv_dim=4)
    out = tmp_path / "xl_merged.safetensors"
    run_json(capsys, "merge", "--base", tiny_sdxl_path, "--adapter", adapter, "--out", out, "--dtype", "fp16")
    ckpt = load_file(out)
    assert all(v.dtype == torch.float16 for v in ckpt.values())
    ref = _reference(tiny_sdxl_path, StableDiffusionXLPipeline, [(adapter, 1.0)])
    fuse_adapter(ref)
    ref.to(torch.float16)
    loaded = StableDiffusionXLPipeline.from_single_file(str(out), config=str(tiny_sdxl_path), local_files_only=True,
                                                       torch_dtype=torch.float16)
    for name in ("unet", "text_encoder", "vae"):
        _assert_same(getattr(loaded, name), getattr(ref, name), 0)
    # diffusers tells its two text encoders apart by width, which the tiny model does not have:
    # read OpenCLIP bigG back with diffusers' own converter instead
    te2 = convert_open_clip_checkpoint(ref.text_encoder_2, ckpt, prefix="conditioner.embedders.1.model.")
    want = ref.text_encoder_2.state_dict()
    assert set(te2) == set(want)
    assert all(torch.equal(te2[k], want[k]) for k in want)


def test_refuses_to_overwrite_and_bad_adapter(capsys, tiny_sd15_path, sd15_adapters, tmp_path):
    a, _ = sd15_adapters
    out = tmp_path / "exists"
    out.mkdir()
    code, _, err = run_cli(capsys, "merge", "--base", tiny_sd15_path, "--adapter", a, "--out", out)
    assert code == 2 and "--overwrite" in err
    code, _, err = run_cli(capsys, "merge", "--base", tiny_sd15_path, "--adapter", tmp_path / "nope.safetensors",
                           "--out", tmp_path / "new")
    assert code == 2 and "no such file" in err and not (tmp_path / "new").exists()

"""load_adapter & co. on tiny SD1.5 / SDXL pipelines, against an independent restatement of the
format spec's formulas (the ComfyUI / A1111 semantics: patch W += multiplier * scale * dW)."""
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import load_file
from torch import nn

from lokr_diffusion import (AdapterConfig, AdapterFileError, create_network, fuse_adapter, list_adapters, load_adapter,
                            set_adapter_scale, unfuse_adapter, unload_adapter)
from lokr_diffusion.naming import diffusers_to_ldm, unet_layout


def _pipe(path, sdxl):
    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    kw = {} if sdxl else {"safety_checker": None, "requires_safety_checker": False}
    pipe = cls.from_pretrained(path, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(pipe):
    g = torch.Generator().manual_seed(0)
    return pipe("a red circle", num_inference_steps=2, height=64, width=64, generator=g, output_type="np",
                guidance_scale=3.0).images


# -- the independent reference -------------------------------------------------------------------

def _reference_dw(t, shape):
    """The spec, section 1-2, restated: rebuild dW and its scale from one module's tensors."""
    if "lokr_w1" in t or "lokr_w1_a" in t:
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        else:
            w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
        b, d = shape[0] // w1.shape[0], shape[1] // w1.shape[1]
        w2 = w2.reshape(b, d, *shape[2:])
        dw = torch.kron(w1.reshape(*w1.shape, *([1] * (len(shape) - 2))), w2)
        r = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else (t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None)
    elif "hada_w1_a" in t:
        dw = ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])).reshape(shape)
        r = t["hada_w1_b"].shape[0]
    else:
        dw = (t["lora_up.weight"].flatten(1) @ t["lora_down.weight"].flatten(1)).reshape(shape)
        r = t["lora_down.weight"].shape[0]
    scale = 1.0 if r is None else float(t["alpha"]) / r
    return dw * scale


def _reference_names(pipe, sdxl):
    names = {}
    layout = unet_layout(pipe.unet)
    for n, m in pipe.unet.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            p = diffusers_to_ldm(n, *layout) if sdxl else n
            if p:
                names["lora_unet_" + p.replace(".", "_")] = m
    tes = [pipe.text_encoder] + ([pipe.text_encoder_2] if sdxl else [])
    prefixes = ["lora_te1", "lora_te2"] if sdxl else ["lora_te"]
    for te, prefix in zip(tes, prefixes):
        for n, m in te.named_modules():
            if isinstance(m, nn.Linear):
                n = n if n.startswith("text_model.") else "text_model." + n
                names[f"{prefix}_{n.replace('.', '_')}"] = m
    return names


@torch.no_grad()
def _reference_patch(pipe, files_and_scales, sdxl):
    names = _reference_names(pipe, sdxl)
    for path, mult in files_and_scales:
        groups = {}
        for k, v in load_file(path).items():
            mod, _, t = k.partition(".")
            groups.setdefault(mod, {})[t] = v.float()
        for mod, t in groups.items():
            m = names[mod]
            m.weight += (mult * _reference_dw(t, tuple(m.weight.shape))).to(m.weight.dtype)


# -- files to load ---------------------------------------------------------------------------------

CONFIGS = {
    "lokr-lowrank-conv": dict(algo="lokr", preset="full", factor=-1, dim=2, alpha=1.0, conv_dim=2, conv_alpha=1.0),
    "lokr-full-f4": dict(algo="lokr", preset="attn-mlp", factor=4, dim=10000, full_matrix=True),
    "lokr-both": dict(algo="lokr", preset="attn-only", factor=-1, dim=1, alpha=0.5, decompose_both=True),
    "loha": dict(algo="loha", preset="full", dim=2, alpha=1.0, conv_dim=2, conv_alpha=2.0),
    "lora": dict(algo="lora", preset="full", dim=3, alpha=1.5, conv_dim=2, conv_alpha=1.0),
}


def _make_file(pipe, sdxl, cfg, path, seed):
    tes = [pipe.text_encoder] + ([pipe.text_encoder_2] if sdxl else [])
    return random_adapter_file(path, cfg, seed, pipe.unet, tes)


def random_adapter_file(path, cfg, seed, denoiser, text_encoders=()):
    """An adapter file of `cfg` on these models with every tensor random (fresh ones are 0), fp32."""
    net = create_network(AdapterConfig(**cfg), unet=denoiser, text_encoders=list(text_encoders))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    net.save(path, dtype=torch.float32)
    net.remove()
    return path


@pytest.fixture(scope="module")
def sd15_pipes(tiny_sd15_path):
    return _pipe(tiny_sd15_path, False), _pipe(tiny_sd15_path, False)


@pytest.fixture(scope="module")
def sdxl_pipes(tiny_sdxl_path):
    return _pipe(tiny_sdxl_path, True), _pipe(tiny_sdxl_path, True)


def _state(pipe):
    return {k: v.clone() for m in (pipe.unet, pipe.text_encoder) for k, v in m.state_dict().items()}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sd15_matches_reference(sd15_pipes, tmp_path, name):
    ours, ref = sd15_pipes
    original = _state(ref)
    path = _make_file(ours, False, CONFIGS[name], tmp_path / f"{name}.safetensors", seed=1)
    base = _run(ours)
    report = load_adapter(ours, path, scale=0.8)
    assert report.patched["unet"] > 0 and report.patched["te"] > 0
    _reference_patch(ref, [(path, 0.8)], False)
    got, want = _run(ours), _run(ref)
    assert abs(got - base).max() > 1e-3  # the adapter changes the image
    assert abs(got - want).max() < 2e-4, abs(got - want).max()
    unload_adapter(ours)
    ref.unet.load_state_dict({k: v for k, v in original.items() if k in ref.unet.state_dict()})
    ref.text_encoder.load_state_dict({k: v for k, v in original.items() if k in ref.text_encoder.state_dict()})


@pytest.mark.parametrize("name", ["lokr-lowrank-conv", "lokr-full-f4", "loha"])
def test_sdxl_matches_reference(sdxl_pipes, tmp_path, name):
    ours, ref = sdxl_pipes
    originals = [{k: v.clone() for k, v in m.state_dict().items()} for m in (ref.unet, ref.text_encoder, ref.text_encoder_2)]
    path = _make_file(ours, True, CONFIGS[name], tmp_path / f"{name}.safetensors", seed=2)
    report = load_adapter(ours, path)
    assert set(report.patched) == {"unet", "te1", "te2"}
    _reference_patch(ref, [(path, 1.0)], True)
    got, want = _run(ours), _run(ref)
    assert abs(got - want).max() < 2e-4, abs(got - want).max()
    unload_adapter(ours)
    for m, sd in zip((ref.unet, ref.text_encoder, ref.text_encoder_2), originals):
        m.load_state_dict(sd)


def test_stack_scale_fuse_unfuse_unload(sd15_pipes, tmp_path):
    ours, ref = sd15_pipes
    original = _state(ours)
    ref_original = _state(ref)
    a = _make_file(ours, False, CONFIGS["lokr-lowrank-conv"], tmp_path / "a.safetensors", seed=3)
    b = _make_file(ours, False, CONFIGS["loha"], tmp_path / "b.safetensors", seed=4)
    base = _run(ours)
    load_adapter(ours, a, scale=0.7, adapter_name="a")
    load_adapter(ours, b, scale=0.5, adapter_name="b")
    assert set(list_adapters(ours)) == {"a", "b"}
    _reference_patch(ref, [(a, 0.7), (b, 0.5)], False)
    stacked = _run(ours)
    assert abs(stacked - _run(ref)).max() < 2e-4

    # switching a scale needs no reload
    set_adapter_scale(ours, "b", 0.0)
    ref.unet.load_state_dict({k: v for k, v in ref_original.items() if k in ref.unet.state_dict()})
    ref.text_encoder.load_state_dict({k: v for k, v in ref_original.items() if k in ref.text_encoder.state_dict()})
    _reference_patch(ref, [(a, 0.7)], False)
    assert abs(_run(ours) - _run(ref)).max() < 2e-4
    set_adapter_scale(ours, "b", 0.5)

    fuse_adapter(ours)
    assert list_adapters(ours)["a"]["fused"]
    fused = _run(ours)
    assert abs(fused - stacked).max() < 2e-4
    unfuse_adapter(ours)
    after = _state(ours)
    assert all(torch.equal(after[k], original[k]) for k in original)  # max error 0: originals restored
    assert abs(_run(ours) - stacked).max() < 1e-6
    fuse_adapter(ours)
    unload_adapter(ours)
    after = _state(ours)
    assert all(torch.equal(after[k], original[k]) for k in original)
    assert abs(_run(ours) - base).max() == 0
    assert list_adapters(ours) == {}
    ref.unet.load_state_dict({k: v for k, v in ref_original.items() if k in ref.unet.state_dict()})
    ref.text_encoder.load_state_dict({k: v for k, v in ref_original.items() if k in ref.text_encoder.state_dict()})


def test_component_scales_and_bare_models(sd15_pipes, tmp_path):
    ours, _ = sd15_pipes
    path = _make_file(ours, False, CONFIGS["lora"], tmp_path / "c.safetensors", seed=5)
    base = _run(ours)
    load_adapter(ours, path, unet_scale=0.0, text_encoder_scale=0.0)
    assert abs(_run(ours) - base).max() == 0
    unload_adapter(ours)
    report = load_adapter(ours.unet, path)  # a bare UNet takes the UNet part, TE keys are reported
    assert set(report.patched) == {"unet"} and report.unmatched
    unload_adapter(ours.unet)
    report = load_adapter(ours.text_encoder, path)  # a bare text encoder takes the TE part
    assert set(report.patched) == {"te"} and report.unmatched
    unload_adapter(ours.text_encoder)
    with pytest.raises(TypeError, match="got Linear"):
        load_adapter(nn.Linear(2, 2), path)


def test_family_mismatch_is_an_error(sd15_pipes, sdxl_pipes, tmp_path):
    xl, _ = sdxl_pipes
    sd, _ = sd15_pipes
    path = _make_file(xl, True, CONFIGS["lokr-full-f4"], tmp_path / "xl.safetensors", seed=6)
    with pytest.raises(AdapterFileError, match="for SDXL, but the model is SD 1.x"):
        load_adapter(sd, path)
    assert list_adapters(sd) == {}


def test_peft_lokr_loads(sd15_pipes, tmp_path):
    """A PEFT LoKr on the UNet (alpha/r applied even with full factors) gives the same outputs here."""
    peft = pytest.importorskip("peft")
    import copy
    ours, _ = sd15_pipes
    unet = copy.deepcopy(ours.unet)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    config = peft.LoKrConfig(r=4, alpha=2, target_modules=targets, init_weights=False, rank_dropout=0.0)
    peft_unet = peft.inject_adapter_in_model(config, unet)
    sd = peft.get_peft_model_state_dict(peft_unet)
    assert any(k.endswith("lokr_w1") for k in sd)
    folder = tmp_path / "peft"
    folder.mkdir()
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text('{"peft_type": "LOKR", "r": 4, "alpha": 2}')
    x = torch.randn(1, unet.config.in_channels, 8, 8)
    ctx = torch.randn(1, 5, unet.config.cross_attention_dim)
    with torch.no_grad():
        want = peft_unet(x, 3, encoder_hidden_states=ctx).sample
        load_adapter(ours.unet, folder)
        got = ours.unet(x, 3, encoder_hidden_states=ctx).sample
    unload_adapter(ours.unet)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()

"""`lokr-diffusion merge` into a tiny FluxPipeline folder: the merged transformer and CLIP-L equal
the base plus scale * dW as the loader builds it, T5 and the VAE stay as they were, --dtype casts
every part (the transformer too), and a single-file OUT is refused before anything loads."""
import pytest
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from transformers import CLIPTextModel, T5EncoderModel

from lokr_diffusion.families.flux import FLUX_DEV
from lokr_diffusion.loading import load_network

from .test_flux_layouts import make_file
from .test_tools_helpers import make_adapter, run_cli, run_json


def _parts(folder, dtype=None):
    kw = {"torch_dtype": dtype} if dtype else {}
    return {"transformer": FluxTransformer2DModel.from_pretrained(folder / "transformer", **kw),
            "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder", **kw),
            "text_encoder_2": T5EncoderModel.from_pretrained(folder / "text_encoder_2", **kw),
            "vae": AutoencoderKL.from_pretrained(folder / "vae", **kw)}


@pytest.fixture(scope="module")
def adapters(tiny_flux_path, tmp_path_factory):
    """A kohya-layout LoRA (fused qkv / linear1, block 0 and the outside layers) and a lycoris_ LoKr
    on the transformer and CLIP-L, as the trainer writes it; the first's expected dW restated."""
    folder = tmp_path_factory.mktemp("flux_merge")
    base = _parts(tiny_flux_path)
    kohya = folder / "kohya.safetensors"
    expected = make_file(base["transformer"], "kohya", "lora", kohya, seed=3)
    lokr = folder / "lokr.safetensors"
    make_adapter(base["transformer"], [base["text_encoder"]], lokr, seed=4, algo="lokr", preset="attn-mlp", factor=4,
                 dim=2)
    return (kohya, 0.5, expected), (lokr, 1.0)


def _loader_deltas(base, path, scale):
    """{(part, module path): scale * dW} as load_network builds the adapter on the base parts."""
    network, _ = load_network(path, unet=base["transformer"], text_encoders=[base["text_encoder"]],
                              family=FLUX_DEV, strict=True, multiplier=scale)
    parts = {id(base["transformer"]): "transformer", id(base["text_encoder"]): "text_encoder"}
    owner = {id(m): (parts[id(model)], name) for model in (base["transformer"], base["text_encoder"])
             for name, m in model.named_modules()}
    out = {owner[id(a.base)]: scale * a.delta_weight().detach().float() for a in network.adapters()}
    network.remove()
    return out


def test_merged_weights_are_base_plus_loader_updates(capsys, tiny_flux_path, adapters, tmp_path):
    (kohya, s1, restated), (lokr, s2) = adapters
    out = tmp_path / "merged"
    r = run_json(capsys, "merge", "--base", tiny_flux_path, "--adapter", f"{kohya}:{s1}", "--adapter", lokr,
                 "--out", out)
    assert r["family"] == "flux" and r["layout"] == "diffusers folder"
    assert r["adapters"][0]["modules"] == {"unet": 23} and r["adapters"][1]["modules"] == {"unet": 34, "te1": 12}
    base, merged = _parts(tiny_flux_path), _parts(out)
    want = {}
    for path, scale in ((kohya, s1), (lokr, s2)):
        for key, delta in _loader_deltas(base, path, scale).items():
            want[key] = want.get(key, 0) + delta
    for part in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        before, after = base[part].state_dict(), merged[part].state_dict()
        assert set(before) == set(after)
        for name, w0 in before.items():
            module = name.rsplit(".", 1)[0]
            if name.endswith(".weight") and (part, module) in want:
                ref = w0 + want[(part, module)]
                assert torch.allclose(after[name], ref, rtol=0, atol=1e-6), (part, name)
            else:
                assert torch.equal(after[name], w0), (part, name)
    # the fused kohya layers reached the Diffusers q/k/v/proj_mlp rows as the spec's math says
    lokr_only = _loader_deltas(base, lokr, s2)
    for layer, delta in restated.items():
        w0, w1 = (parts["transformer"].state_dict()[f"{layer}.weight"] for parts in (base, merged))
        got = w1 - w0 - lokr_only.get(("transformer", layer), 0)
        assert torch.allclose(got, s1 * delta, atol=1e-5), layer


def test_dtype_casts_the_transformer_too(capsys, tiny_flux_path, adapters, tmp_path):
    (kohya, s1, _), _ = adapters
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    run_json(capsys, "merge", "--base", tiny_flux_path, "--adapter", f"{kohya}:{s1}", "--out", fp32)
    r = run_json(capsys, "merge", "--base", tiny_flux_path, "--adapter", f"{kohya}:{s1}", "--out", bf16,
                 "--dtype", "bf16")
    assert r["dtype"] == "bfloat16"
    full, half = _parts(fp32), _parts(bf16, torch.bfloat16)
    for part in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        want = full[part].state_dict()
        got = half[part].state_dict()
        assert {v.dtype for v in got.values() if v.is_floating_point()} == {torch.bfloat16}, part
        assert all(torch.equal(got[k], want[k].to(torch.bfloat16)) for k in want if want[k].is_floating_point()), part


def test_single_file_out_is_refused_before_loading(capsys, tiny_flux_path, adapters, tmp_path):
    (kohya, _, _), _ = adapters
    out = tmp_path / "merged.safetensors"
    code, _, err = run_cli(capsys, "merge", "--base", tiny_flux_path, "--adapter", kohya, "--out", out)
    assert code == 2 and "cannot write Flux.1 [dev] as one original-layout checkpoint file" in err
    assert "give a folder as OUT" in err and not out.exists()

"""`lokr-diffusion merge` into a tiny StableDiffusion3Pipeline folder: the merged transformer and
CLIP towers equal the base plus scale * dW as the loader builds it; T5 and the VAE stay as they were."""
import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from transformers import CLIPTextModelWithProjection, T5EncoderModel

from lokr_diffusion.families.sd3 import SD35_LARGE
from lokr_diffusion.loading import load_network

from .test_tools_helpers import make_adapter, run_json

TEXT = ("text_encoder", "text_encoder_2")


def _parts(folder):
    return {"transformer": SD3Transformer2DModel.from_pretrained(folder / "transformer"),
            **{name: CLIPTextModelWithProjection.from_pretrained(folder / name) for name in TEXT},
            "text_encoder_3": T5EncoderModel.from_pretrained(folder / "text_encoder_3"),
            "vae": AutoencoderKL.from_pretrained(folder / "vae")}


def test_merged_weights_are_base_plus_loader_updates(capsys, tiny_sd3_path, tmp_path):
    base = _parts(tiny_sd3_path)
    adapter = tmp_path / "sd3_lokr.safetensors"
    make_adapter(base["transformer"], [base[n] for n in TEXT], adapter, seed=5, algo="lokr", preset="attn-mlp",
                 factor=4, dim=2)
    r = run_json(capsys, "merge", "--base", tiny_sd3_path, "--adapter", f"{adapter}:0.7", "--out", tmp_path / "m")
    assert r["family"] == SD35_LARGE.name and set(r["adapters"][0]["modules"]) == {"unet", "te1", "te2"}
    network, _ = load_network(adapter, unet=base["transformer"], text_encoders=[base[n] for n in TEXT],
                              family=SD35_LARGE, strict=True, multiplier=0.7)
    owner = {id(m): (part, name) for part in ("transformer", *TEXT) for name, m in base[part].named_modules()}
    want = {owner[id(a.base)]: 0.7 * a.delta_weight().detach().float() for a in network.adapters()}
    network.remove()
    merged = _parts(tmp_path / "m")
    for part in base:
        before, after = base[part].state_dict(), merged[part].state_dict()
        assert set(before) == set(after)
        for name, w0 in before.items():
            key = (part, name.rsplit(".", 1)[0])
            if name.endswith(".weight") and key in want:
                assert torch.allclose(after[name], w0 + want[key], rtol=0, atol=1e-6), (part, name)
            else:
                assert torch.equal(after[name], w0), (part, name)
    assert {p for p, _ in want} == {"transformer", *TEXT}

"""`lokr-diffusion plan` for Flux.1: parameters and file size of the network the trainer builds on
the real FLUX.1-dev architecture (meta device), and the training memory estimate, restated here
from its stated parts (frozen weights in the training dtype, fp32 adapter weights, gradients and
optimizer states, the counted activations)."""
from pathlib import Path

import pytest

from lokr_diffusion import AdapterConfig, create_network
from lokr_diffusion.families import get_family
from lokr_diffusion.tools.plan import format_plan

from .test_tools_helpers import run_cli, run_json

ROOT = Path(__file__).resolve().parent.parent
FLUX_DEV_TRANSFORMER = 11_901_408_320  # the DiT spec's count


def _params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def meta():
    return get_family("flux").build_meta()


def test_family_name_plans_the_real_architecture(capsys, meta):
    r = run_json(capsys, "plan", "--model", "flux", "--algo", "lokr", "--preset", "attn-mlp", "--factor", "16",
                 "--dim", "10000")
    transformer, (clip, t5) = meta
    cfg = AdapterConfig(algo="lokr", preset="attn-mlp", factor=16, dim=10000)
    net = create_network(cfg, transformer, [clip, None])  # the trainer's default: CLIP-L, T5 frozen
    assert r["parameters"] == net.num_parameters() and r["modules"] == {"unet": 418, "te1": 72}
    m = r["memory"]
    assert _params(transformer) == FLUX_DEV_TRANSFORMER
    assert m["assumes"] == {"mixed_precision": "bf16", "weight_bytes": 2, "optimizer": "adamw",
                            "resolution": [1024, 1024], "batch_size": 1, "gradient_checkpointing": True, "ema": False,
                            "base_dtype": "auto"}
    assert m["frozen_weights"] == 2 * (FLUX_DEV_TRANSFORMER + _params(clip))
    assert m["adapter"] == 16 * r["parameters"]  # fp32 weight, fp32 gradient, two fp32 AdamW moments
    # at least every checkpointed block's input: (4096 image + 512 T5 tokens) x 3072 x 2 B for 57 blocks
    assert m["activations"] > 57 * ((1024 // 16) ** 2 + 512) * 3072 * 2
    assert m["total"] == m["frozen_weights"] + m["adapter"] + m["activations"] and m["widening"] == 0
    assert m["caching_text_encoders"] == 2 * _params(t5)
    out = format_plan(r)  # the text `plan` prints (counting Flux's activations again costs seconds)
    assert "training memory (estimate, bf16, adamw, batch 1, 1024x1024, gradient checkpointing): " in out
    assert "  frozen weights:  " in out and "  adapter:         " in out and "  activations:     " in out
    assert "not included: text encoders without adapters" in out and "CUDA context" in out


def test_memory_flags(capsys):
    args = ["plan", "--model", "flux-schnell", "--preset", "attn-only", "--factor", "8", "--dim", "10000",
            "--resolution", "256"]
    base = run_json(capsys, *args)["memory"]
    r = run_json(capsys, *args, "--no-gradient-checkpointing", "--optimizer", "adamw8bit", "--mixed-precision", "no",
                 "--batch-size", "2")["memory"]
    # without checkpointing, fp32 and batch 2 the saved activations grow by far more than 2 x 2
    assert r["activations"] > 8 * base["activations"]
    assert r["adapter_bytes_per_parameter"] == 10 and r["frozen_weights"] == 2 * base["frozen_weights"]
    fp8 = run_json(capsys, *args, "--base-dtype", "fp8")["memory"]
    assert 0.5 * base["frozen_weights"] < fp8["frozen_weights"] < 0.6 * base["frozen_weights"]  # Linear weights 1 B
    assert fp8["widening"] > 0 and fp8["activations"] == base["activations"]
    code, _, err = run_cli(capsys, *args, "--batch-size", "0")
    assert code == 2 and "--batch-size must be at least 1" in err


def test_sd_families_count_their_activations(capsys):
    m = run_json(capsys, "plan", "--model", "sd15", "--preset", "attn-only")["memory"]
    assert m["activations"] > 0 and m["activations_how"].startswith("counted")
    assert m["assumes"]["resolution"] == [512, 512]


def test_tiny_flux_folder_from_its_configs(capsys, tiny_flux_path):
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel

    r = run_json(capsys, "plan", "--model", tiny_flux_path, "--preset", "full", "--factor", "4", "--dim", "2")
    assert r["source"].endswith("(configs only)") and r["family"] == "flux"
    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux_path / "transformer")
    clip = CLIPTextModel.from_pretrained(tiny_flux_path / "text_encoder")
    net = create_network(AdapterConfig(preset="full", factor=4, dim=2), transformer, [clip, None])
    assert r["parameters"] == net.num_parameters()


def test_flux_lokr_config_and_its_comment(capsys):
    """train_configs/flux_lokr.toml: the numbers its comment quotes are the ones plan --config reports."""
    path = ROOT / "train_configs" / "flux_lokr.toml"
    r = run_json(capsys, "plan", "--config", path)
    assert r["family"] == "flux" and r["modules"] == {"unet": 418}
    m = r["memory"]
    assert m["frozen_weights"] == 2 * FLUX_DEV_TRANSFORMER  # text encoders frozen, parked after caching
    text = path.read_text()
    for number in (r["parameters"], r["file_size"]["bf16"], r["file_size"]["fp16"], r["file_size"]["fp32"],
                   FLUX_DEV_TRANSFORMER):
        assert f"{number:,}" in text, number
    for gib in (m["total"], m["frozen_weights"], m["adapter"], m["activations"], m["caching_text_encoders"]):
        assert f"{gib / 2**30:.1f} GiB" in text, gib
    assert f"({m['total'] / 1e9:.1f} GB)" in text
    assert 'pretrained_model = "black-forest-labs/FLUX.1-dev"' in text and 'mixed_precision = "bf16"' in text


"""`lokr-diffusion plan`: the numbers are those of the network the trainer builds."""
import os
from pathlib import Path

import pytest
import torch

from lokr_diffusion import AdapterConfig, create_network
from lokr_diffusion.families import get_family

from .helpers import load_components
from .test_tools_helpers import run_cli, run_json


def _check_against(r, net):
    assert r["parameters"] == net.num_parameters()
    per_module = net.num_parameters(per_module=True)
    assert {m["key"]: m["parameters"] for m in r["module_list"]} == per_module
    shapes = {i.key: {n: list(s) for n, s in i.shapes.items()} for i in net.modules_info()}
    assert {m["key"]: m["tensors"] for m in r["module_list"]} == shapes
    assert sum(g["count"] for g in r["shape_groups"]) == len(per_module)
    assert sum(r["modules"].values()) == len(per_module)


def test_family_name_uses_the_real_architecture(capsys):
    r = run_json(capsys, "plan", "--model", "sd15", "--algo", "lokr", "--preset", "full", "--factor", "8",
                 "--dim", "4", "--conv-dim", "2", "--alpha", "2", "--no-memory")
    assert "memory" not in r
    cfg = AdapterConfig(algo="lokr", preset="full", factor=8, dim=4, conv_dim=2, alpha=2.0)
    unet, tes = get_family("sd15").build_meta()
    _check_against(r, create_network(cfg, unet, tes))
    assert r["modules"] == {"unet": 282, "te": 72}  # the format spec's preset table
    assert r["family"] == "sd1"
    fc = r["factor_comparison"]
    assert fc["8"] == r["parameters"]
    assert r["file_size"]["fp32"] > r["file_size"]["fp16"] > 0


def test_model_folder_and_exact_file_sizes(capsys, tiny_sdxl_path, tmp_path):
    args = ["plan", "--model", tiny_sdxl_path, "--algo", "lokr", "--preset", "attn-mlp", "--factor", "4", "--dim", "2"]
    r = run_json(capsys, *args)
    unet, tes = load_components(tiny_sdxl_path)
    cfg = AdapterConfig(algo="lokr", preset="attn-mlp", factor=4, dim=2)
    net = create_network(cfg, unet, tes)
    _check_against(r, net)
    assert r["source"].endswith("(configs only)") and r["family"] == "sdxl"
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        path = net.save(tmp_path / "adapter.safetensors", dtype=dtype)  # the plan's title is "adapter"
        assert os.path.getsize(path) == r["file_size"][name], name
    net.remove()


@pytest.mark.parametrize("algo", ["loha", "lora"])
def test_other_algorithms(capsys, tiny_sd15_path, algo):
    r = run_json(capsys, "plan", "--model", tiny_sd15_path, "--algo", algo, "--preset", "attn-only", "--dim", "3")
    unet, tes = load_components(tiny_sd15_path)
    _check_against(r, create_network(AdapterConfig(algo=algo, preset="attn-only", dim=3), unet, tes))
    assert "factor_comparison" not in r


def test_text_explains_factor_versus_dim(capsys, tiny_sd15_path):
    code, out, _ = run_cli(capsys, "plan", "--model", tiny_sd15_path, "--factor", "4", "--dim", "10000")
    assert code == 0
    assert "a larger factor means a bigger w1, a smaller w2 and so fewer parameters" in out
    assert "file size:" in out and "fp16" in out and "bf16" in out
    r = run_json(capsys, "plan", "--model", tiny_sd15_path, "--factor", "4", "--dim", "10000")
    fc = {int(k): v for k, v in r["factor_comparison"].items()}
    assert fc[8] < fc[4]  # w2 full everywhere: a larger factor, fewer parameters
    assert r["lokr_w2_low_rank"]["low_rank"] == 0


def test_bad_settings_exit_2(capsys):
    code, _, err = run_cli(capsys, "plan", "--model", "sd15", "--factor", "0")
    assert code == 2 and "factor" in err
    code, _, err = run_cli(capsys, "plan", "--model", "/no/such/model")
    assert code == 2 and "does not exist" in err


@pytest.mark.parametrize("config", sorted(p.name for p in (Path(__file__).parent.parent / "train_configs").glob("*.toml")))
def test_plan_config_equals_what_the_trainer_builds(config):
    """`plan --config` must report the network train.py builds for the same TOML: the trainer's
    create_network call (adapter config, train_unet / train_text_encoder) on the same architecture."""
    from lokr_diffusion.families import get_family
    from lokr_diffusion.tools.plan import plan_config
    from lokr_diffusion.training.config import load_config

    path = Path(__file__).parent.parent / "train_configs" / config
    cfg = load_config(path)
    result = plan_config(path, memory=False)  # the estimate has its own tests
    assert "memory" not in result
    local = cfg.base_dir / cfg.model.pretrained_model
    if local.exists():  # the quickstart's bundled toy model
        from lokr_diffusion.tools.plan import models_for

        unet, encoders, _ = models_for(str(local.resolve()))
    else:
        unet, encoders = get_family(cfg.model.family).build_meta()
    from lokr_diffusion.network import chosen_text_encoders, family_of

    family = family_of(unet, encoders)
    network = create_network(cfg.network.adapter_config(), unet=unet if cfg.network.train_unet else None,
                             text_encoders=chosen_text_encoders(family, encoders, cfg.network), family=family)
    assert result["parameters"] == network.num_parameters()
    assert sum(result["modules"].values()) == len(network.module_keys())
    assert result["parameters"] > 0

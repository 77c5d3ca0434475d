"""The README stays true: its commands are CI's, its examples run, its key tables are complete."""
import dataclasses
import re
from pathlib import Path

import pytest
import torch

from lokr_diffusion.data import DatasetConfig, dataset_configs_from_toml
from lokr_diffusion.training.config import SECTIONS, load_config

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _commands():
    return re.findall(r"```bash\n(.*?)\n```", README, re.S)


def test_readme_opens_with_quickstart_and_test_commands():
    first, second = _commands()[:2]
    assert "accelerate launch train.py --config train_configs/quickstart.toml" in first
    assert first.startswith("pip install torch==2.13.0 && pip install -e .")
    assert second == 'pip install torch==2.13.0 && pip install -e ".[dev]" && python -m pytest -q'
    ci = (ROOT / ".ci" / "run").read_text()
    assert second in ci.splitlines()  # CI runs exactly the README's test command


def test_config_reference_lists_every_key():
    documented = set(re.findall(r"`([a-z_0-9]+)`", README))
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.name in documented, f"[{name}] {f.name} is missing from the README reference"
    for f in dataclasses.fields(DatasetConfig):
        if f.name != "name":
            assert f.name in documented, f"[data] {f.name} is missing from the README reference"


def test_generated_readme_blocks_are_current():
    """The config reference (from the fields' help texts) and the family table (from the family
    registry) are made from code; refresh them with `python -m lokr_diffusion.schema --write README.md`."""
    from lokr_diffusion.schema import generated_blocks, readme_block

    for start, end, block in generated_blocks():
        assert readme_block(README, start, end) == block, \
            f"README block {start!r} is stale: run python -m lokr_diffusion.schema --write README.md"


def test_family_table_names_every_registered_family():
    from lokr_diffusion.families import FAMILIES
    from lokr_diffusion.schema import FAMILIES_END, FAMILIES_START, readme_block

    table = readme_block(README, FAMILIES_START, FAMILIES_END)
    rows = [line for line in table.splitlines()[2:] if line.startswith("|")]
    assert [r.split("|")[1].strip() for r in rows] == [f.title for f in FAMILIES]
    assert all(f.layouts_read for f in FAMILIES) and all(f.layout_written for f in FAMILIES if f.trains)


@pytest.mark.parametrize("path", sorted((ROOT / "train_configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert dataset_configs_from_toml(cfg.data, base_dir=cfg.base_dir)


def test_readme_diffusers_example_runs(tiny_sd15_path, tmp_path):
    from lokr_diffusion import AdapterConfig, create_network

    from .helpers import load_components
    unet, tes = load_components(tiny_sd15_path)
    net = create_network(AdapterConfig(preset="attn-mlp", factor=4, dim=4), unet=unet, text_encoders=tes)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    adapter = net.save(tmp_path / "style.safetensors")
    code = re.search(r"<!-- example:diffusers -->\s*```python\n(.*?)```", README, re.S).group(1)
    scope = {"MODEL": str(tiny_sd15_path), "ADAPTER": str(adapter)}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["report"].patched["unet"] == 192
    assert scope["image"].size == (64, 64)

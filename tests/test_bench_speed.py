"""bench/bench_speed.py on toy models: the comparison stays fair (same modules, same outputs as
LyCORIS) for every family the bench knows, and a `--flux` run rewrites only its own section.

The benchmark itself takes minutes to hours; these run its code paths on the families' tiny
models in seconds, so a library change that breaks the bench shows up here, not at the next
benchmark run.
"""
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lycoris")
pytest.importorskip("peft")

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    _load("speed_impls")
    return _load("bench_speed")


@pytest.mark.parametrize("setup_name,scenario", [("dry", "attn-mlp-f8-full"), ("dry-flux", "flux-attn-mlp-f16-full"),
                                                 ("dry-flux", "flux-attn-mlp-f-1-r16")])
def test_every_implementation_adapts_the_same_modules_and_ours_matches_lycoris(bench, setup_name, scenario):
    S = sys.modules["speed_impls"]
    # fp32 throughout: in bf16 a toy adapter's effect is below the rounding of the outputs
    setup = dataclasses.replace(S.SETUPS[setup_name](), dtype=torch.float32, autocast=None)
    atts = S.build_all(setup, S.SCENARIO_BY_KEY[scenario])  # raises where a count differs
    counts = {n: a.count for n, a in atts.items() if n != "floor"}
    assert len(set(counts.values())) == 1 and counts["ours"] > 0
    assert atts["ours"].n_params() == atts["lycoris"].n_params()  # PEFT may split toy widths its own way
    inputs = S.make_inputs(setup)
    assert S.copy_ours_into_lycoris(atts["ours"], atts["lycoris"]) > 0
    outs = {}
    for name in ("floor", "ours", "lycoris"):
        S.activate(atts[name], atts)
        with torch.no_grad():
            outs[name] = S.forward(atts[name].model, inputs, inputs["sample"])
        S.train_step(setup, atts[name], inputs)
    assert S.rel_diff(outs["ours"], outs["lycoris"]) < 1e-5
    assert S.rel_diff(outs["ours"], outs["floor"]) > 10 * S.rel_diff(outs["ours"], outs["lycoris"])


def test_flux_targets_are_the_family_preset(bench):
    from lokr_diffusion.families import FLUX_DEV

    S = sys.modules["speed_impls"]
    setup = S.dry_flux_setup()
    model = S.build_model(setup)
    paths = S.target_paths(model, S.SCENARIO_BY_KEY["flux-attn-mlp-f16-full"], setup.family)
    chosen = FLUX_DEV.preset_filter(model, "attn-mlp")
    assert paths == [p for p, m in model.named_modules() if isinstance(m, torch.nn.Linear) and chosen(p)]
    assert not any("norm" in p for p in paths)  # modulation stays out of attn-mlp


def test_splice_section_replaces_inserts_and_keeps_the_rest(bench):
    text = "# T\n\nintro\n\n## A\n\na\n\n## GPU\n\ng\n\n## Reproduce\n\nr\n"
    added = bench.splice_section(text, "## Flux-shaped", ["## Flux-shaped: x", "", "one"], ("## GPU",))
    assert added == "# T\n\nintro\n\n## A\n\na\n\n## Flux-shaped: x\n\none\n\n## GPU\n\ng\n\n## Reproduce\n\nr\n"
    again = bench.splice_section(added, "## Flux-shaped", ["## Flux-shaped: y", "", "two"], ("## GPU",))
    assert again == added.replace("x\n\none", "y\n\ntwo")
    last = bench.splice_section(text, "## Reproduce", ["## Reproduce", "", "new", ""])
    assert last == text.replace("r\n", "new\n")
    appended = bench.splice_section("# T\n", "## New", ["## New", "", "n"])
    assert appended == "# T\n\n## New\n\nn\n"


def test_a_flux_run_rewrites_only_its_section(bench, tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    before = ("# Benchmarks\n\nheader 1.23x\n\n## CPU: x\n\n| ours | 1.330x |\n\n"
              "## The per-layer path choice against measurement\n\nrows\n\n## GPU\n\nnone\n\n"
              "## Reproduce\n\n```\nold\n```\n")
    md.write_text(before)
    js = tmp_path / "flux.json"
    argv = ["--flux", "--dry-flux", "--rounds", "1", "--warmup", "0", "--no-memory", "--threads", "1",
            "--scenarios", "flux-attn-mlp-f16-full", "--md", str(md), "--flux-json", str(js),
            "--png", str(tmp_path / "speed.png")]
    assert bench.main(argv) == 0
    torch.set_num_threads(1)
    after = md.read_text()
    head, rest = after.split("## Flux-shaped", 1)
    assert head == before.split("## The per-layer")[0]
    assert "## The per-layer path choice against measurement\n\nrows\n\n## GPU\n\nnone\n\n" in rest
    assert "--flux" in rest.split("## Reproduce")[1]
    assert not (tmp_path / "speed.png").exists()  # the chart belongs to full runs
    stored = json.loads(js.read_text())
    entry = stored["scenarios"]["flux-attn-mlp-f16-full"]
    assert set(entry["train"]) == {"floor", "ours", "lycoris", "lycoris-bypass", "peft"}
    assert entry["agreement"]["vs_lycoris"] < 1e-5
    assert "ours (fused)" in entry["infer"]
    # a second run replaces the section instead of adding one
    assert bench.main(argv) == 0
    torch.set_num_threads(1)
    assert md.read_text().count("## Flux-shaped") == 1

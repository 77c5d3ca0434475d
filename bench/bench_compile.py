"""torch.compile with adapters: a compiled LoKr training step against the compiled frozen floor.

The UNet and scenario are bench_speed.py's main CPU case (SD 1.5 config at widths 128/256/512/512,
batch 2, 32x32 latents, fp32; LoKr attn-mlp factor 8 full matrix). Four copies of the same
weights run in interleaved rounds: the floor (frozen UNet, gradient to the input latents) and
ours, each eager and each compiled in place the way `[train] compile = true` does it
(`training.compilation.compile_in_place`, inductor). The first calls (compilation) are warm-up, reported apart.
Results go to docs/benchmarks/compile_results.json and the "Compiled" section of BENCHMARKS.md
(the rest of the file is left as it is; a full bench_speed.py run keeps the stored section).

    python bench/bench_compile.py [--rounds 5] [--threads 2] [--backend inductor]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_speed as B  # noqa: E402  (sets the thread environment before torch loads)
import speed_impls as S  # noqa: E402

COMPILE_JSON = B.ROOT / "docs" / "benchmarks" / "compile_results.json"
HEADING = "## Compiled (torch.compile"
TARGET = 1.15


def measure(rounds: int, threads: int, backend: str) -> dict:
    import torch
    import torch._dynamo as dynamo

    from lokr_diffusion.training.compilation import compile_in_place

    torch.set_num_threads(threads)
    env = B.environment(threads)
    setup, scen = S.cpu_setup(), S.SCENARIOS[0]
    base = S.build_model(setup)
    paths = S.target_paths(base, scen, setup.family)
    inputs = S.make_inputs(setup)
    models = {"floor eager": S.attach("floor", copy.deepcopy(base), scen, paths),
              "ours eager": S.attach("ours", copy.deepcopy(base), scen, paths)}
    models["floor compiled"] = S.attach("floor", copy.deepcopy(base), scen, paths)
    models["ours compiled"] = S.attach("ours", copy.deepcopy(base), scen, paths)
    del base
    first = {}
    dynamo.reset()
    for name, att in models.items():
        if name.endswith("compiled"):
            compile_in_place(att.model, backend)  # as `[train] compile = true` does it
        t0 = time.perf_counter()
        S.train_step(setup, att, inputs)  # compiles the training graph for the compiled ones
        first[name] = time.perf_counter() - t0
    configs = {name: (lambda: None, (lambda att=att: S.train_step(setup, att, inputs)), lambda: None)
               for name, att in models.items()}
    times = B.interleaved(configs, rounds, warmup=1)

    def ratio(num: str, den: str, clock: int) -> float:
        return statistics.median(B.paired_ratios(times, num, den, clock))

    return {
        "setup": setup.label, "scenario": scen.title, "backend": backend, "rounds": rounds, "threads": threads,
        "adapted_modules": models["ours eager"].count, "adapter_parameters": models["ours eager"].n_params(),
        "first_call_s": first,
        "median_s": {n: statistics.median(w for w, _ in t) for n, t in times.items()},
        "median_cpu_s": {n: statistics.median(c for _, c in t) for n, t in times.items()},
        "ratios": {clock_name: {"ours/floor compiled": ratio("ours compiled", "floor compiled", clock),
                                "ours/floor eager": ratio("ours eager", "floor eager", clock),
                                "floor compiled/eager": ratio("floor compiled", "floor eager", clock),
                                "ours compiled/eager": ratio("ours compiled", "ours eager", clock)}
                   for clock, clock_name in ((0, "wall"), (1, "cpu"))},
        "env": env,
    }


def compile_section(r: dict) -> list[str]:
    """The report section for stored results `r`."""
    w, c = r["ratios"]["wall"], r["ratios"]["cpu"]
    met = "meets" if w["ours/floor compiled"] <= TARGET else "misses"
    L = [f"{HEADING}, CPU)", "",
         f"{r['setup']}; {r['scenario']} ({r['adapted_modules']} modules, {r['adapter_parameters']:,} parameters); "
         f"training step (forward, MSE, backward); backend {r['backend']}, {r['threads']} threads, {r['rounds']} "
         f"interleaved rounds, medians of per-round ratios; measured {r['env']['date']} with load average "
         f"{', '.join(f'{x:.1f}' for x in r['env'].get('load_avg_at_start', []))} at the start. "
         f"Made by `python bench/bench_compile.py` (results in `docs/benchmarks/compile_results.json`).", "",
         "| ratio | wall | CPU |", "|---|---|---|"]
    for key in ("ours/floor compiled", "ours/floor eager", "floor compiled/eager", "ours compiled/eager"):
        L.append(f"| {key} | {w[key]:.3f} | {c[key]:.3f} |")
    L += ["", "| configuration | first call s (compiles) | median step s | median CPU s |", "|---|---|---|---|"]
    for name in r["median_s"]:
        L.append(f"| {name} | {r['first_call_s'][name]:.1f} | {r['median_s'][name]:.3f} | "
                 f"{r['median_cpu_s'][name]:.3f} |")
    L += ["", f"Target: a compiled step with adapters within {TARGET}x of the compiled floor; this run {met} it "
          f"({w['ours/floor compiled']:.3f}x wall, {c['ours/floor compiled']:.3f}x CPU).", ""]
    return L


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--backend", default="inductor", choices=("inductor", "aot_eager"))
    p.add_argument("--md", type=Path, default=B.DEFAULT_MD)
    p.add_argument("--json", type=Path, default=COMPILE_JSON)
    args = p.parse_args(argv)
    B.quiet_libraries()
    results = measure(args.rounds, args.threads, args.backend)
    results["env"]["load_avg_at_end"] = list(B.os.getloadavg())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    text = args.md.read_text()
    args.md.write_text(B.splice_section(text, HEADING, compile_section(results), B.FLUX_BEFORE))
    print("\n".join(compile_section(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""LoKr training and inference speed: ours against the frozen floor, LyCORIS and PEFT.

One command regenerates BENCHMARKS.md and docs/benchmarks/speed.png (`pip install -e ".[bench]"` first):

    python bench/bench_speed.py            # full run, about 10-15 minutes on 2 CPU cores
    python bench/bench_speed.py --quick    # main scenario only, fewer rounds (a few minutes)

What it measures, all on the same UNet (the real SD 1.5 config at widths 128/256/512/512,
batch 2, 32x32 latents, fp32, 2 threads by default):

* training step (forward, MSE loss, backward; no optimizer) for the floor (frozen UNet, the
  gradient still flows to the input), ours, LyCORIS (default and bypass) and PEFT LoKr, on
  three scenarios (attn-mlp factor 8 full matrix; attn-mlp factor -1 rank 4; the full preset
  with convs). All adapters target the same modules (checked), get the same small random factors,
  and ours is checked to give LyCORIS's outputs. Steps run in interleaved rounds (every
  configuration once per round, rotating order) and each round's ratio to the floor is taken
  in that round, so the drift of a shared machine cancels; medians are reported.
* peak memory of a training step: on CPU each configuration in a fresh subprocess (peak RSS);
  on CUDA the step's max allocated above what is resident;
* inference (no grad): floor, ours unfused, ours fused (merged into the weights), peers
  unfused; and the time to merge/unmerge all adapters;
* the cost model behind the per-layer path choice, against a timing of each path on every
  distinct layer shape of the UNet;
* a profile of the main scenario: which ops make up the difference to the floor.

With a CUDA device present it also runs the GPU variant (the real SDXL UNet, bf16) and stores
its results in docs/benchmarks/gpu_results.json, which later CPU-only runs include in the report.

    python bench/bench_speed.py --flux     # the Flux-shaped case only: 40 min to 2 h on 2 cores

measures the same training step and inference on a Flux.1-dev transformer at its real width
(3072 wide, MLP 12288) with one double and one single block, 1024 image + 512 text tokens, for
LoKr attn-mlp factor 16 full matrix and factor -1 rank 16. A Flux step is 15-30 s on 2 idle
cores (a minute on a busy machine; one scenario took an hour at load 5), so this case is not
part of the full run (it would at least triple it): its results go to
docs/benchmarks/flux_results.json and the "Flux-shaped" section of BENCHMARKS.md, and the
run rewrites only that section (and the reproduce lines); full runs include the stored results.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Idle OpenMP threads sleep instead of spinning. On a shared 2-core machine a spinning thread
# holds the core the other thread is waiting for, and every parallel region can then stall for a
# scheduler tick (8 ms seen here): that noise swamps everything else. --omp-active keeps the default.
if "--omp-active" not in sys.argv:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]  # this checkout's lokr_diffusion, whatever is installed
import speed_impls as S

DEFAULT_MD = ROOT / "BENCHMARKS.md"
DEFAULT_PNG = ROOT / "docs" / "benchmarks" / "speed.png"
GPU_JSON = ROOT / "docs" / "benchmarks" / "gpu_results.json"
FLUX_JSON = ROOT / "docs" / "benchmarks" / "flux_results.json"
COMPILE_JSON = ROOT / "docs" / "benchmarks" / "compile_results.json"
FLUX_HEADING = "## Flux-shaped"
COMMAND = "python bench/bench_speed.py"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def quiet_libraries() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lycoris", "diffusers", "peft", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from lycoris.logging import logger as lyco_logger

        lyco_logger.setLevel(logging.ERROR)
    except Exception:  # pragma: no cover - lycoris missing or changed
        pass


# ------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------

def _timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def interleaved(configs: dict, rounds: int, warmup: int) -> dict[str, list[tuple[float, float]]]:
    """configs: name -> (prepare, run, finish). Every configuration once per round, in a rotating
    order (reversed every other round), the garbage collector off while timing. Returns
    name -> [(wall, cpu) per round]."""
    names = list(configs)
    for name in names:
        prepare, run, finish = configs[name]
        prepare()
        for _ in range(warmup):
            run()
        finish()
    times = {n: [] for n in names}
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            k = r % len(names)
            order = names[k:] + names[:k]
            if r % 2:
                order = order[::-1]
            for name in order:
                prepare, run, finish = configs[name]
                prepare()
                times[name].append(_timed(run))
                finish()
                gc.collect()
    finally:
        gc.enable()
    return times


def paired_ratios(times: dict, num: str, den: str, clock: int = 0) -> list[float]:
    return [a[clock] / b[clock] for a, b in zip(times[num], times[den])]


def run_training(setup, atts, inputs, rounds, warmup):
    def cfg(att):
        return (lambda: S.activate(att, atts), lambda: S.train_step(setup, att, inputs), lambda: None)

    return interleaved({name: cfg(att) for name, att in atts.items()}, rounds, warmup)


def run_inference(setup, atts, inputs, rounds, warmup):
    ours = atts.get("ours")
    configs = {}
    for name, att in atts.items():
        if name == "ours":
            def unfused(a=att):
                # Unfused inference runs on a patched copy of each weight, rebuilt when something
                # changed: the fused rounds in between change the weights, so rebuild it untimed
                # here and time the steady state.
                S.activate(a, atts)
                S.infer_step(setup, a, inputs)

            configs["ours (unfused)"] = (unfused, lambda a=att: S.infer_step(setup, a, inputs), lambda: None)

            def merge(a=att):
                S.activate(a, atts)
                a.handle.merge()

            configs["ours (fused)"] = (merge, lambda a=att: S.infer_step(setup, a, inputs), lambda a=att: a.handle.unmerge())
        else:
            configs[name] = (lambda a=att: S.activate(a, atts), lambda a=att: S.infer_step(setup, a, inputs),
                             lambda: None)
    for att in atts.values():
        att.model.eval()
    try:
        times = interleaved(configs, rounds, warmup)
        merge_t, unmerge_t = [], []
        if ours is not None:
            S.activate(ours, atts)
            for _ in range(3):
                merge_t.append(_timed(ours.handle.merge)[0])
                unmerge_t.append(_timed(ours.handle.unmerge)[0])
    finally:
        for att in atts.values():
            att.model.train()
    return times, {"merge_s": S.median(merge_t), "unmerge_s": S.median(unmerge_t)}


def summarise(times: dict, floor: str) -> dict:
    """Medians of wall time, and of the per-round ratios (wall and CPU time) to the floor and
    between ours and each other configuration."""
    out = {}
    for name, ts in times.items():
        row = {"median_s": S.median([t[0] for t in ts]), "median_cpu_s": S.median([t[1] for t in ts]),
               "times_s": [t[0] for t in ts], "cpu_s": [t[1] for t in ts]}
        if floor in times:
            row["x_floor"] = S.median(paired_ratios(times, name, floor))
            row["x_floor_cpu"] = S.median(paired_ratios(times, name, floor, 1))
        out[name] = row
    ours = "ours" if "ours" in times else ("ours (unfused)" if "ours (unfused)" in times else None)
    if ours:
        for name in times:
            if not name.startswith("ours") and name != floor:
                out[name]["ours_speedup"] = S.median(paired_ratios(times, name, ours))
                out[name]["ours_speedup_cpu"] = S.median(paired_ratios(times, name, ours, 1))
    return out


# ------------------------------------------------------------------------------------------
# memory (fresh subprocess per configuration)
# ------------------------------------------------------------------------------------------

def measure_memory(setup_name: str, scen_key: str, impls, threads: int) -> dict:
    out = {}
    for impl in impls:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child-memory", setup_name, scen_key, impl,
               "--threads", str(threads)]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not line:
            log(f"  memory child failed for {impl}: {proc.stderr[-2000:]}")
            continue
        out[impl] = json.loads(line[-1])
        log(f"  memory {scen_key:18s} {impl:15s} peak {out[impl].get('peak_alloc_mb', out[impl]['peak_rss_mb']):8.0f} MB")
    return out


# ------------------------------------------------------------------------------------------
# cost model against measurement
# ------------------------------------------------------------------------------------------

def check_model(setup, scen, rounds: int = 7, kinds=("linear", "conv")) -> list[dict]:
    """Time every path (fwd + bwd) on every distinct adapted layer of the UNet of these kinds."""
    from torch import nn

    from lokr_diffusion.algos import lokr
    from lokr_diffusion.layers import AdapterModule

    atts = S.build_all(setup, scen, impls=("ours",))
    ours = atts["ours"]
    unet = ours.model
    shapes: dict[str, tuple] = {}
    hooks = []
    def record(key):
        def hook(module, args, out):
            shapes.setdefault(key, (tuple(args[0].shape), tuple(out.shape)))
        return hook

    for a in ours.handle.adapters():
        hooks.append(a.base.register_forward_hook(record(a.key)))
    S.train_step(setup, ours, S.make_inputs(setup))
    for h in hooks:
        h.remove()
    ours.handle.set_enabled(False)  # each probe below attaches its own adapter to the layer
    groups: dict[tuple, list] = {}
    for a in ours.handle.adapters():
        b = a.base
        if ("conv" if isinstance(b, nn.Conv2d) else "linear") not in kinds:
            continue
        geom = (("conv", tuple(b.kernel_size), tuple(b.stride), tuple(b.padding)) if isinstance(b, nn.Conv2d)
                else ("linear",))
        sig = (geom, tuple(b.weight.shape), shapes[a.key][0], tuple(sorted((n, tuple(t.shape)) for n, t in a.tensors().items())))
        groups.setdefault(sig, []).append(a)
    rows = []
    for sig, adapters in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        a0 = adapters[0]
        base = a0.base
        x_shape = sig[2]
        tens = {n: t.detach().clone() for n, t in a0.tensors().items()}
        mod = AdapterModule("probe", base, lokr, tens, float(a0.alpha))
        mod.attach()
        x = torch.randn(x_shape, device=setup.device)
        g = torch.randn(shapes[a0.key][1], device=setup.device)
        w1 = lokr.make_w1(mod.tensors())
        out_dim, in_dim = base.weight.shape[:2]
        a_, c_ = w1.shape
        b_, d_ = out_dim // a_, in_dim // c_
        k = base.weight[0, 0].numel()
        if isinstance(base, nn.Conv2d):
            n_in = x_shape[0] * x_shape[2] * x_shape[3]
            n_out = g.shape[0] * g.shape[2] * g.shape[3]
        else:
            n_in = n_out = x.numel() // in_dim
        kind = "conv" if isinstance(base, nn.Conv2d) else "linear"
        # as the dispatcher decides: an fp32 layer without autocast folds a rebuilt dW into its weight
        fold = base.weight.dtype == torch.float32 and setup.autocast is None
        costs = lokr.path_costs(kind, n_in, n_out, a_, b_, c_, d_, k, True, 4, setup.device, fold)
        choice = lokr.plan(kind, n_in, n_out, a_, b_, c_, d_, k, True, 4, setup.device, fold)

        x.requires_grad_(True)

        def run(path, xr=x, mod=mod, base=base, g=g):
            if path == "base":
                mod.enabled = False
            with lokr.force_path(None if path == "base" else path):
                y = base(xr)
                y.backward(g)
            mod.enabled = True
            xr.grad = None
            for p in mod.parameters():
                p.grad = None

        # every path the cost model prices for this layer (fold-in for 1x1 convs, both folds for linear ones)
        paths = tuple(costs)
        cfgs = {p: (lambda: None, lambda p=p: run(p), lambda: None) for p in ("base",) + paths}
        times = interleaved(cfgs, rounds, 2)
        med = {p: S.median([t[1] for t in ts]) for p, ts in times.items()}  # CPU time: steadier
        best = min(paths, key=med.get)
        mod.detach()
        path0 = ours.handle.paths[a0.key]
        rows.append({
            "example": path0, "layers": len(adapters), "kind": kind if kind == "linear" else f"conv{sig[0][1][0]}x{sig[0][1][1]}/s{sig[0][2][0]}",
            "in": in_dim, "out": out_dim, "tokens": n_in, "abcd": (a_, b_, c_, d_),
            "model_choice": choice, "measured_best": best,
            "ms": {p: 1e3 * v for p, v in med.items()},
            "model_ms": {p: 1e3 * v for p, v in costs.items()},
            "loss": med[choice] / med[best] - 1.0,
        })
        log(f"  model check {path0[:60]:60s} x{len(adapters):<3d} choice {choice:7s} best {best:7s} "
            + " ".join(f"{p}={1e3 * med[p]:.2f}ms" for p in ("base",) + paths))
    del atts, ours, unet
    gc.collect()
    return rows


# ------------------------------------------------------------------------------------------
# profile
# ------------------------------------------------------------------------------------------

def profile_diff(setup, scen, repeats: int = 3) -> dict:
    """Self CPU time per op, floor against ours: one profiled step each, alternating, `repeats`
    times; per op the smallest of the repeats (other jobs on the machine only ever add time)."""
    from torch.profiler import ProfilerActivity, profile

    atts = S.build_all(setup, scen, impls=("floor", "ours"))
    inputs = S.make_inputs(setup)
    for name in ("floor", "ours"):
        S.activate(atts[name], atts)
        S.train_step(setup, atts[name], inputs)
    samples = {"floor": [], "ours": []}
    for _ in range(repeats):
        for name in ("floor", "ours"):
            S.activate(atts[name], atts)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                S.train_step(setup, atts[name], inputs)
            samples[name].append({e.key: (e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()})
    tables = {}
    for name, reps in samples.items():
        ops = set().union(*reps)
        tables[name] = {k: (min(r.get(k, (0.0, 0))[0] for r in reps), max(r.get(k, (0.0, 0))[1] for r in reps))
                        for k in ops}
    keys = set(tables["floor"]) | set(tables["ours"])
    rows = []
    for k in keys:
        fb, cb = tables["floor"].get(k, (0.0, 0))
        fo, co = tables["ours"].get(k, (0.0, 0))
        rows.append({"op": k, "floor_ms": fb, "ours_ms": fo, "diff_ms": fo - fb, "calls_floor": cb, "calls_ours": co})
    rows.sort(key=lambda r: -r["diff_ms"])
    total = {n: sum(v[0] for v in t.values()) for n, t in tables.items()}
    del atts
    gc.collect()
    cats = {"products (bmm/mm/conv)": ("aten::bmm", "aten::mm", "aten::addmm", "aten::convolution_backward",
                                       "aten::mkldnn_convolution", "aten::_convolution"),
            "copies": ("aten::copy_", "aten::clone", "aten::contiguous"),
            "adds (output + delta, gradient accumulation)": ("aten::add", "aten::add_"),
            "reductions": ("aten::sum",)}
    by_cat = {c: 0.0 for c in cats}
    by_cat["attention, norms, rest"] = 0.0
    by_cat["Python, autograd nodes, views"] = 0.0
    light = ("_Kron", "aten::view", "aten::transpose", "aten::as_strided", "aten::empty", "aten::select",
             "aten::expand", "aten::t", "aten::reshape", "aten::_unsafe_view", "aten::unsqueeze", "aten::permute",
             "autograd::", "torch::autograd", "aten::detach", "detach", "aten::resolve", "aten::slice")
    for r in rows:
        for c, ops in cats.items():
            if r["op"] in ops:
                by_cat[c] += r["diff_ms"]
                break
        else:
            key = "Python, autograd nodes, views" if r["op"].startswith(light) else "attention, norms, rest"
            by_cat[key] += r["diff_ms"]
    return {"total_ms": total, "rows": rows[:14], "categories": by_cat,
            "rows_all": [r for r in rows if r["op"] in ("aten::mm", "aten::addmm")]}


# ------------------------------------------------------------------------------------------
# suites
# ------------------------------------------------------------------------------------------

def run_suite(setup, scenarios, rounds: int, warmup: int, memory: bool, threads: int) -> dict:
    res = {"setup": setup.label, "device": setup.device, "rounds": rounds, "scenarios": {}}
    for scen in scenarios:
        log(f"{setup.name}: scenario {scen.title}: building the model copies")
        atts = S.build_all(setup, scen)
        res["model_params"] = sum(p.numel() for p in atts["floor"].model.parameters())  # ours adds none to it
        inputs = S.make_inputs(setup)
        copied = S.copy_ours_into_lycoris(atts["ours"], atts["lycoris"])
        outs = {}
        for name in ("ours", "lycoris", "lycoris-bypass"):
            S.activate(atts[name], atts)
            S.infer_step(setup, atts[name], inputs)  # warm
            with torch.no_grad(), S._autocast(setup):
                outs[name] = S.forward(atts[name].model, inputs, inputs["sample"])
        agree = {"copied_tensors": copied, "vs_lycoris": S.rel_diff(outs["ours"], outs["lycoris"]),
                 "vs_lycoris_bypass": S.rel_diff(outs["ours"], outs["lycoris-bypass"])}
        del outs
        entry = {"title": scen.title, "modules": {n: a.count for n, a in atts.items()},
                 "adapter_params": {n: a.n_params() for n, a in atts.items()}, "agreement": agree}
        log(f"  modules {entry['modules']}; ours vs LyCORIS outputs: rel. diff {agree['vs_lycoris']:.1e}")
        times = run_training(setup, atts, inputs, rounds, warmup)
        entry["train"] = summarise(times, "floor")
        for name, row in entry["train"].items():
            log(f"  train {name:15s} median {row['median_s']:.3f} s  x floor {row.get('x_floor', float('nan')):.3f}")
        if setup.device == "cuda":  # memory in-process: the step's peak above what is resident
            entry["memory"] = {}
            for name, att in atts.items():
                S.activate(att, atts)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                S.train_step(setup, att, inputs)
                entry["memory"][name] = {"peak_alloc_mb": (torch.cuda.max_memory_allocated() - before) / 2**20}
                log(f"  memory {name:15s} step peak above resident {entry['memory'][name]['peak_alloc_mb']:8.0f} MB")
        itimes, merge = run_inference(setup, atts, inputs, rounds, max(1, warmup))
        entry["infer"] = summarise(itimes, "floor")
        entry["merge"] = merge
        for name, row in entry["infer"].items():
            log(f"  infer {name:15s} median {row['median_s']:.3f} s  x floor {row.get('x_floor', float('nan')):.3f}")
        del atts, inputs
        gc.collect()
        if setup.device == "cuda":
            torch.cuda.empty_cache()
        if memory and setup.device == "cpu":
            entry["memory"] = measure_memory(setup.name, scen.key, S.IMPLS, threads)
        res["scenarios"][scen.key] = entry
    return res


def environment(threads: int) -> dict:
    import diffusers
    import peft

    def version(mod, dist):
        try:
            from importlib.metadata import version as v

            return v(dist)
        except Exception:
            return getattr(mod, "__version__", "?")

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env = {"date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "cpu": cpu, "cores": os.cpu_count(),
           "threads": threads, "python": platform.python_version(), "torch": torch.__version__,
           "diffusers": diffusers.__version__, "lycoris": version(None, "lycoris-lora"), "peft": peft.__version__}
    try:
        env["load_avg_at_start"] = os.getloadavg()
    except OSError:
        pass
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------

NAMES = {"floor": "floor (frozen base)", "ours": "**ours**", "lycoris": "LyCORIS", "lycoris-bypass": "LyCORIS bypass",
         "peft": "PEFT", "ours (unfused)": "**ours, unfused**", "ours (fused)": "**ours, fused**"}


def _fmt(x, spec=".2f", dash="-"):
    if x is None or (isinstance(x, float) and x != x):
        return dash
    return format(x, spec)


def _x(v, spec=".3f"):
    return _fmt(v, spec) + "x" if v is not None and v == v else "-"


def scenario_tables(entry: dict, device: str) -> list[str]:
    lines = []
    mem = entry.get("memory", {})
    floor_mem = mem.get("floor", {})
    mem_key = "peak_alloc_mb" if device == "cuda" else "peak_rss_mb"
    mem_label = "step peak above resident (MB)" if device == "cuda" else "peak RSS (MB)"
    lines.append(f"| training step | modules | adapter params | median step (s) | x floor | x floor (CPU time) | "
                 f"ours faster by | {mem_label} | vs floor (MB) |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in S.IMPLS:
        row = entry["train"].get(name)
        if row is None:
            continue
        m = mem.get(name, {}).get(mem_key)
        dm = (m - floor_mem[mem_key]) if (m is not None and mem_key in floor_mem) else None
        lines.append(f"| {NAMES[name]} | {entry['modules'].get(name, 0)} | {S.human(entry['adapter_params'].get(name, 0))} | "
                     f"{_fmt(row['median_s'], '.3f')} | {_x(row.get('x_floor'))} | {_x(row.get('x_floor_cpu'))} | "
                     f"{_x(row.get('ours_speedup'), '.2f')} | "
                     f"{_fmt(m, '.0f')} | {('+' if dm is not None and dm >= 0 else '') + _fmt(dm, '.0f')} |")
    lines.append("")
    lines.append("| inference (no grad) | median forward (s) | x floor | x floor (CPU time) | ours unfused faster by |")
    lines.append("|---|---:|---:|---:|---:|")
    for name, row in entry["infer"].items():
        lines.append(f"| {NAMES.get(name, name)} | {_fmt(row['median_s'], '.3f')} | {_x(row.get('x_floor'))} | "
                     f"{_x(row.get('x_floor_cpu'))} | {_x(row.get('ours_speedup'), '.2f')} |")
    mg = entry.get("merge", {})
    if mg.get("merge_s") == mg.get("merge_s"):
        lines.append("")
        lines.append(f"Fusing all {entry['modules'].get('ours', 0)} adapters into the weights took "
                     f"{1e3 * mg['merge_s']:.0f} ms, unfusing {1e3 * mg['unmerge_s']:.0f} ms (vectorised kron, "
                     f"one fp32 add per weight). With the same factor values, the outputs of ours and LyCORIS "
                     f"differ by {entry['agreement']['vs_lycoris']:.1e} (max, relative).")
    return lines


def targets_table(cpu: dict) -> list[str]:
    main = cpu["scenarios"].get("attn-mlp-f8-full")
    if main is None:
        return []
    tr, inf, mem = main["train"], main["infer"], main.get("memory", {})
    ours_x = tr["ours"]["x_floor"]
    rows = ["| target (CPU, attn-mlp factor 8 full matrix) | measured (wall) | CPU time | met |", "|---|---:|---:|:---:|"]
    rows.append(f"| training step <= 1.15x the frozen floor | {ours_x:.3f}x | {_x(tr['ours'].get('x_floor_cpu'))} | "
                f"{'yes' if ours_x <= 1.15 else 'no'} |")
    for peer in S.PEERS:
        sp = tr[peer].get("ours_speedup")
        rows.append(f"| >= 1.2x faster per step than {NAMES[peer]} | {sp:.2f}x | {_x(tr[peer].get('ours_speedup_cpu'), '.2f')} | "
                    f"{'yes' if sp >= 1.2 else 'no'} |")
        if peer in mem and "ours" in mem:
            po, pp = mem["ours"]["peak_rss_mb"], mem[peer]["peak_rss_mb"]
            rows.append(f"| lower peak memory than {NAMES[peer]} | {po:.0f} vs {pp:.0f} MB | | {'yes' if po < pp else 'no'} |")
    un = inf["ours (unfused)"]
    fu = inf["ours (fused)"]
    rows.append(f"| unfused inference <= 1.05x the floor | {un['x_floor']:.3f}x | {_x(un.get('x_floor_cpu'))} | "
                f"{'yes' if un['x_floor'] <= 1.05 else 'no'} |")
    rows.append(f"| fused inference 1.00x | {fu['x_floor']:.3f}x | {_x(fu.get('x_floor_cpu'))} | "
                f"{'yes' if fu['x_floor'] <= 1.02 else 'no'} |")
    return rows


def model_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    total = sum(r["layers"] for r in rows)
    agree = sum(r["layers"] for r in rows if r["model_choice"] == r["measured_best"])
    near = sum(r["layers"] for r in rows if r["loss"] <= 0.10)
    out = [f"Per distinct adapted layer of the main scenario's UNet (and the full preset's convs), one layer's "
           f"forward + backward in isolation with each path forced (median of interleaved repeats; rebuild: "
           f"W + dW in the layer's own product, as fp32 training runs it; fold: the best of fold-in and "
           f"fold-tok, dW detached in that product and the factors' gradients from the activations). The model "
           f"picks the measured best for {agree}/{total} layers and a path within 10% of it for {near}/{total}.", "",
           "| layer (example) | n | kind | in -> out | tokens | a,b,c,d | base ms | in ms | out ms | rebuild ms | fold ms "
           "| model picks | measured best | loss |",
           "|---|---:|---|---|---:|---|---:|---:|---:|---:|---:|---|---|---:|"]
    for r in rows:
        ms = r["ms"]
        folds = [ms[p] for p in ("fold-in", "fold-tok") if p in ms]
        out.append(f"| `{r['example']}` | {r['layers']} | {r['kind']} | {r['in']} -> {r['out']} | {r['tokens']} | "
                   f"{','.join(map(str, r['abcd']))} | {ms['base']:.2f} | {ms['in']:.2f} | {ms['out']:.2f} | "
                   f"{ms['rebuild']:.2f} | {f'{min(folds):.2f}' if folds else '-'} | {r['model_choice']} | "
                   f"{r['measured_best']} | {100 * r['loss']:.0f}% |")
    return out


def profile_table(prof: dict) -> list[str]:
    if not prof:
        return []
    t = prof["total_ms"]
    out = [f"One training step, self CPU time per op (torch.profiler, profiler overhead included; per op the "
           f"smallest of three alternating profiled steps): floor {t['floor']:.0f} ms, ours {t['ours']:.0f} ms. "
           f"The ops that grew most:", "",
           "| op | floor ms | ours ms | difference ms | calls floor -> ours |", "|---|---:|---:|---:|---:|"]
    for r in prof["rows"]:
        out.append(f"| `{r['op'][:60]}` | {r['floor_ms']:.1f} | {r['ours_ms']:.1f} | {r['diff_ms']:+.1f} | "
                   f"{r['calls_floor']} -> {r['calls_ours']} |")
    if prof.get("categories"):
        diff = t["ours"] - t["floor"]
        out += ["", "The difference by kind of work:", "", "| kind | ms | share of the difference |", "|---|---:|---:|"]
        for k, v in sorted(prof["categories"].items(), key=lambda kv: -kv[1]):
            out.append(f"| {k} | {v:+.0f} | {100 * v / diff:.0f}% |")
    return out


def closing_notes(results: dict) -> list[str]:
    """What was measured against the targets, where the time goes, and what would close the gap."""
    cpu = results.get("cpu") or {}
    main = cpu.get("scenarios", {}).get("attn-mlp-f8-full")
    prof = results.get("profile")
    if not main:
        return []
    tr, inf, mem = main["train"], main["infer"], main.get("memory", {})
    x = tr["ours"]["x_floor"]
    xc = tr["ours"].get("x_floor_cpu", float("nan"))
    out = []
    missed = []
    if x > 1.15:
        missed.append(f"the training step is {x:.3f}x the floor (CPU time {xc:.3f}x), not <= 1.15x")
    slow = [f"{NAMES[p]} ({tr[p]['ours_speedup']:.2f}x)" for p in S.PEERS if tr[p].get("ours_speedup", 9) < 1.2]
    if slow:
        missed.append("ours is less than 1.2x faster per step than " + ", ".join(slow))
    if "ours" in mem and all(p in mem for p in S.PEERS):
        worse = [NAMES[p] for p in S.PEERS if mem["ours"]["peak_rss_mb"] >= mem[p]["peak_rss_mb"]]
        if worse:
            missed.append("peak memory is not below " + ", ".join(worse))
    if inf["ours (unfused)"]["x_floor"] > 1.05:
        missed.append(f"unfused inference is {inf['ours (unfused)']['x_floor']:.3f}x the floor")
    if inf["ours (fused)"]["x_floor"] > 1.02:  # the same code as the floor's: the run's noise
        missed.append(f"fused inference is {inf['ours (fused)']['x_floor']:.3f}x the floor, running the "
                      "frozen layers' own code (so this much is the machine's noise in this run)")
    if missed:
        out.append("Targets not reached in this run: " + "; ".join(missed) + ".")
    else:
        out.append("All targets were reached in this run.")
    if prof and prof.get("categories"):
        t = prof["total_ms"]
        diff = t["ours"] - t["floor"]
        cats = sorted(prof["categories"].items(), key=lambda kv: -kv[1])
        floor_lin = sum(r["floor_ms"] for r in prof.get("rows_all", []) if r["op"] in ("aten::mm", "aten::addmm"))
        out.append("")
        out.append(f"Where the time goes (profile above, {diff:.0f} ms over the floor's {t['floor']:.0f} ms): "
                   + ", ".join(f"{k} {v:+.0f} ms" for k, v in cats if abs(v) >= 1) + ".")
        if floor_lin:
            out.append(f"The floor itself spends {floor_lin:.0f} ms ({100 * floor_lin / t['floor']:.0f}%) in the linear "
                       f"layers' products.")
    out += ["",
            "Why: with factor 8 and full-matrix w2, a factored linear layer's update costs three products with "
            "w2 per step (forward, input gradient, w2 gradient), each 1/8 of the layer's own dense product, plus "
            "four small w1 mixes, regrouping copies (or the small batched products of the token-major order), "
            "the add of the delta to the layer's output and the accumulation of the input gradient. At 128 to "
            "512 channels w2 is only 16x16 to 64x64, so those products and the mixes are limited by memory "
            "traffic, not arithmetic: each is roughly one pass over an activation-sized tensor, and at 128 "
            "channels one pass costs a fifth to a tenth of the layer's dense product on this machine. Rebuilding "
            "dW as a product of its own (what LyCORIS and PEFT do) costs three dense products per layer; added "
            "to an fp32 layer's weight, one (the weight gradient); added detached (the fold paths), none, the "
            "factors' gradients then costing half of the factored backward pass plus a few weight-sized passes. "
            "The cost model picks per layer, and the table above compares its picks with the measured best.",
            "",
            "What would close the rest: (1) one fused kernel per direction (regroup, w1 mix, w2 product and "
            "the add in one pass; a custom C++/Triton op) would cut the passes per layer to about three; (2) "
            "at real SD widths (320/640/1280) the dense products grow with the square of the width and the "
            "passes only linearly, so the same code lands closer to the floor."]
    return out


PLAIN = {"lycoris": "LyCORIS", "lycoris-bypass": "LyCORIS bypass", "peft": "PEFT"}


def flux_headline(entry: dict) -> str:
    """One sentence per Flux scenario (README material): the step against the floor and the peers,
    wall time with CPU time beside it, since a minute-long step on a shared machine can swing the
    wall reading and the two disagreeing is the sign to trust neither alone."""
    tr = entry["train"]

    def both(row, key):
        return f"{row[key]:.2f}x (CPU time {row.get(key + '_cpu', float('nan')):.2f}x)"

    peers = [f"{PLAIN[p]} {both(tr[p], 'ours_speedup')}" for p in S.PEERS if tr.get(p, {}).get("ours_speedup")]
    line = f"{entry['title']}: ours {both(tr['ours'], 'x_floor')} the frozen floor per training step"
    if peers:
        line += "; the peers' step over ours: " + ", ".join(peers)
    inf = entry.get("infer", {})
    if "ours (unfused)" in inf:
        line += (f"; inference {inf['ours (unfused)']['x_floor']:.2f}x the floor unfused, "
                 f"{inf['ours (fused)']['x_floor']:.2f}x fused")
    return line + "."


def _load_text(env: dict) -> str:
    start, end = env.get("load_avg_at_start"), env.get("load_avg_at_end")
    if not start:
        return ""
    text = f"; load average (1/5/15 min) {', '.join(f'{x:.1f}' for x in start)} at the start"
    return text + (f" and {', '.join(f'{x:.1f}' for x in end)} at the end" if end else "")


def flux_section(flux: dict, md_path: Path, json_path: Path) -> list[str]:
    """The "Flux-shaped" section, from the stored Flux results alone: it carries its own command,
    date and machine state, because a `--flux` run rewrites only this section."""
    env = flux.get("env", {})
    scens = list(flux["scenarios"].values())
    n_mod = scens[0]["modules"].get("ours", 0) if scens else 0
    minutes = flux.get("elapsed_s", 0) / 60
    L = [f"{FLUX_HEADING}: Flux.1-dev width, reduced depth (CPU)", "",
         f"Measured by `{flux.get('command', COMMAND + ' --flux')}` on {env.get('date', '?')} in {minutes:.0f} min "
         f"({env.get('cores', '?')} cores, {env.get('threads', '?')} torch threads{_load_text(env)}; torch "
         f"{env.get('torch', '?')}, diffusers {env.get('diffusers', '?')}, lycoris-lora {env.get('lycoris', '?')}, "
         f"peft {env.get('peft', '?')}), {flux.get('rounds', '?')} interleaved rounds; stored in "
         f"`{os.path.relpath(json_path, md_path.parent)}`. Too long for the full run, so `--flux` runs it alone "
         f"and rewrites only this section; full runs include the stored numbers.", "",
         f"Model: {flux['setup']}. Inputs: random packed latents `hidden_states` (B, tokens, 64), T5 states "
         f"(B, text tokens, 4096), CLIP pooled (B, 768), timestep, guidance 1.0, and `img_ids` / `txt_ids` as "
         f"FluxPipeline makes them. Every Linear keeps its real Flux shape (3072 x 3072 attention, 3072 <-> 12288 "
         f"MLP, 15360 -> 3072 single-block output) and sees the real token count; only the number of blocks is cut. "
         f"Blocks of a kind are identical, so depth multiplies their time in every configuration; what it changes "
         f"is the weight of the unadapted layers outside the blocks (mostly `context_embedder`, about 2% of the "
         f"floor's forward products here, a fraction of a percent at 19 + 38 blocks), so at full depth the ratios "
         f"to the floor would be a little higher and the gaps between implementations a little wider.", "",
         f"Adapter: LoKr on the Flux family's attn-mlp preset (`FLUX_DEV.preset_filter`: attention projections and "
         f"MLPs of both block kinds, AdaLN modulation left out as kohya trains Flux), {n_mod} layers here (418 at "
         f"full depth). LyCORIS gets that list as `target_name`s, PEFT as `LoKrConfig(target_modules=...)`; the "
         f"counts below are checked equal, and ours reproduces LyCORIS's outputs with the same factor values. The "
         f"floor is the frozen transformer's forward + backward to the input tokens. Peak memory: peak RSS of a "
         f"fresh process building one model and running two training steps (the model is "
         f"{S.human(flux.get('model_params', 0))} fp32 parameters).", ""]
    L += ["In one line:", ""] + [f"* {flux_headline(e)}" for e in scens] + [""]
    for entry in scens:
        L += [f"### {entry['title']}", ""] + scenario_tables(entry, "cpu") + [""]
    return L


def reproduce_lines() -> list[str]:
    return ["## Reproduce", "", "```",
            COMMAND + "            # everything but Flux (CPU, plus the GPU variant where CUDA is present)",
            COMMAND + " --quick    # main scenario only, fewer rounds",
            COMMAND + " --flux     # the Flux-shaped case alone (long); rewrites only its section",
            "python bench/bench_compile.py          # compiled against eager (torch.compile); rewrites only its section",
            "```", ""]


def splice_section(text: str, heading: str, lines: list[str], before: tuple[str, ...] = ()) -> str:
    """`text` with its `## ` section whose heading starts with `heading` replaced by `lines`, or,
    without one, `lines` inserted ahead of the first section headed by one of `before` (else
    appended). Everything else stays byte for byte: a partial run must not touch numbers it
    did not measure."""
    chunks = re.split(r"(?m)^(?=## )", text)
    block = "\n".join(lines).rstrip("\n") + "\n\n"
    at = next((i for i, c in enumerate(chunks) if c.startswith(heading)), None)
    if at is not None:
        chunks[at] = block if at < len(chunks) - 1 else block.rstrip("\n") + "\n"
    else:
        at = next((i for i, c in enumerate(chunks) if i and c.startswith(before)), None)
        if at is None:
            chunks.append(("\n" if not text.endswith("\n\n") else "") + block.rstrip("\n") + "\n")
        else:
            chunks.insert(at, block)
    return "".join(chunks)


# Where a Flux section goes in a report that has none yet: right after the CPU scenarios.
FLUX_BEFORE = ("## The per-layer path choice", "## Where the time goes", "## Closing note", "## GPU", "## Reproduce")


def update_flux_section(md_path: Path, flux: dict, json_path: Path) -> None:
    """Rewrite only the Flux section (and the reproduce lines) of an existing report."""
    text = md_path.read_text()
    text = splice_section(text, FLUX_HEADING, flux_section(flux, md_path, json_path), FLUX_BEFORE)
    text = splice_section(text, "## Reproduce", reproduce_lines())
    md_path.write_text(text)
    log(f"updated the Flux section of {md_path}")


def _bar_panel(ax, scens: list[dict], kind: str, names: list[str], colors: dict, target: float, ylabel: str,
               title: str) -> None:
    """One chart panel: per scenario, a bar per configuration of its ratio to the floor."""
    width = 0.8 / len(names)
    for i, impl in enumerate(names):
        vals = [s[kind].get(impl, {}).get("x_floor", float("nan")) for s in scens]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(scens))]
        bars = ax.bar(xs, vals, width, label=impl, color=colors.get(impl, "#444444"))
        for b, v in zip(bars, vals):
            if v == v:
                ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    ax.axhline(target, color="#d62728", ls="--", lw=0.8)
    ax.set_xticks(range(len(scens)))
    ax.set_xticklabels([s["title"].replace(", ", "\n", 1) for s in scens], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    ax.set_ylim(0.9, None)


def write_chart(results: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart (pip install matplotlib)"
    suites = [(k, results[k]) for k in ("cpu", "flux", "gpu") if results.get(k)]
    fig, axes = plt.subplots(len(suites), 2, figsize=(13, 4.2 * len(suites)), squeeze=False)
    colors = {"floor": "#999999", "ours": "#d62728", "lycoris": "#1f77b4", "lycoris-bypass": "#6baed6", "peft": "#2ca02c",
              "ours (unfused)": "#d62728", "ours (fused)": "#ff9896"}
    for row, (name, suite) in enumerate(suites):
        scens = list(suite["scenarios"].values())
        _bar_panel(axes[row][0], scens, "train", list(S.IMPLS), colors, 1.15, "training step / frozen floor",
                   f"{name.upper()}: training step (median of paired rounds)")
        _bar_panel(axes[row][1], scens, "infer", list(scens[0]["infer"]), colors, 1.05,
                   "forward (no grad) / frozen floor", f"{name.upper()}: inference")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_report(results: dict, md_path: Path, png_path: Path, args) -> None:
    env = results["env"]
    cpu = results.get("cpu")
    gpu = results.get("gpu")
    chart_note = write_chart(results, png_path)
    png_rel = os.path.relpath(png_path, md_path.parent)
    L = ["# Benchmarks", "",
         f"Generated by `{results['command']}` on {env['date']} (this file and "
         f"`{png_rel}` are rewritten by that command; do not edit by hand).", "",
         f"Machine: {env['cpu']}, {env['cores']} cores, {env['threads']} torch threads"
         + (f", load average (1/5/15 min) {', '.join(f'{x:.1f}' for x in env['load_avg_at_start'])} at the start" if env.get("load_avg_at_start") else "")
         + (f" and {', '.join(f'{x:.1f}' for x in env['load_avg_at_end'])} at the end" if env.get("load_avg_at_end") else "")
         + f". Python {env['python']}, torch {env['torch']}, diffusers {env['diffusers']}, "
         f"lycoris-lora {env['lycoris']}, peft {env['peft']}.", "",
         "How: every configuration runs in the same process, in interleaved rounds (each configuration "
         "once per round, rotating order), and a configuration's ratio to the floor (or to ours) is the median "
         "of the per-round ratios, so the drift of a shared machine cancels. The floor is the frozen UNet's "
         "forward + backward with the gradient flowing to the input latents, the least any adapter's training "
         "step can cost; every configuration computes that same input gradient. Steps are forward + MSE loss + "
         "backward (no optimizer step). Peak memory on CPU is measured per configuration in a fresh subprocess (two "
         "training steps, peak RSS = `VmHWM`). All implementations target the same "
         "modules with the same shapes (counts and parameter numbers below), and with the same factor values ours "
         "reproduces LyCORIS's outputs. Threads wait passively (`OMP_WAIT_POLICY=PASSIVE`, set by the "
         "command unless `--omp-active`): on a shared 2-core machine spinning threads turn every parallel region "
         "into a possible scheduler-tick stall. The CPU-time columns (process CPU seconds, same rounds) are the "
         "steadier reading when the machine is busy.", ""]
    if chart_note:
        L += [f"_{chart_note}_", ""]
    else:
        L += [f"![speed chart]({png_rel})", ""]
    if cpu:
        L += ["## Targets", ""] + targets_table(cpu) + [""]
        L += [f"## CPU: {cpu['setup']}", ""]
        for entry in cpu["scenarios"].values():
            L += [f"### {entry['title']}", ""] + scenario_tables(entry, "cpu") + [""]
    if results.get("flux"):
        L += flux_section(results["flux"], md_path, args.flux_json)
    if COMPILE_JSON.exists():  # measured by bench_compile.py, kept across runs of this one
        from bench_compile import compile_section

        L += compile_section(json.loads(COMPILE_JSON.read_text()))
    if results.get("model_check"):
        L += ["## The per-layer path choice against measurement", ""] + model_table(results["model_check"]) + [""]
    if results.get("profile"):
        L += ["## Where the time goes (main scenario, CPU)", ""] + profile_table(results["profile"]) + [""]
    notes = closing_notes(results)
    if notes:
        L += ["## Closing note", ""] + notes + [""]
    L += ["## GPU", ""]
    if gpu:
        L += [f"{gpu['setup']}. Run on {gpu.get('env', {}).get('gpu', 'a CUDA device')} "
              f"({gpu.get('env', {}).get('date', '?')}, torch {gpu.get('env', {}).get('torch', '?')}); stored in "
              f"`{os.path.relpath(args.gpu_json, md_path.parent)}` and included here by later runs. Memory on CUDA: "
              f"`max_memory_allocated` during one training step minus what was allocated before it (activations, "
              f"gradients and temporaries; the weights of all copies stay resident).", ""]
        for entry in gpu["scenarios"].values():
            L += [f"### {entry['title']}", ""] + scenario_tables(entry, "cuda") + [""]
    else:
        L += ["No CUDA device on the machine that generated this file, and no stored GPU results: the GPU "
              "variant (real SDXL UNet, bf16) runs automatically where `torch.cuda.is_available()`.", ""]
    L += reproduce_lines()
    md_path.write_text("\n".join(L))
    log(f"wrote {md_path} and {png_path}")


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------

def pick_scenarios(args, available) -> list:
    """--scenarios picks by key among `available`; --quick keeps the first."""
    if args.scenarios:
        keys = {s.key for s in available}
        bad = [k for k in args.scenarios.split(",") if k not in keys]
        if bad:
            raise SystemExit(f"unknown scenario(s) {', '.join(bad)} here; expected some of {', '.join(sorted(keys))}")
        return [S.SCENARIO_BY_KEY[k] for k in args.scenarios.split(",")]
    return list(available[:1] if args.quick else available)


def command_line(args) -> str:
    """The command as the report should quote it: the options that change what is measured."""
    cmd = COMMAND + (" --flux" if args.flux else "") + (" --dry-flux" if args.dry_flux else "")
    cmd += " --quick" if args.quick else ""
    cmd += f" --threads {args.threads}" if args.threads != 2 else ""
    cmd += (f" --rounds {args.rounds}" if args.rounds else "") + (f" --scenarios {args.scenarios}" if args.scenarios else "")
    return cmd + (" --no-memory" if args.no_memory and args.flux else "")


def run_flux(args, rounds: int) -> int:
    """The Flux-shaped case alone: measure, store its JSON, then rewrite only its section of the
    report (a whole report from it alone where none exists yet), so the numbers of the other
    sections stay those of the run that measured them."""
    setup = S.dry_flux_setup() if args.dry_flux else S.flux_setup()
    scenarios = pick_scenarios(args, S.FLUX_SCENARIOS)
    env = environment(args.threads)
    t_start = time.time()
    log(f"Flux-shaped case: {setup.label}")
    res = run_suite(setup, scenarios, rounds, args.warmup, not args.no_memory, args.threads)
    res["elapsed_s"] = time.time() - t_start
    res["command"] = command_line(args)
    try:
        env["load_avg_at_end"] = os.getloadavg()
    except OSError:
        pass
    res["env"] = env
    args.flux_json.parent.mkdir(parents=True, exist_ok=True)
    args.flux_json.write_text(json.dumps(res, indent=1))
    log(f"Flux results written to {args.flux_json}")
    for entry in res["scenarios"].values():
        log("  " + flux_headline(entry))
    if args.md.exists():
        update_flux_section(args.md, res, args.flux_json)
    else:
        write_report({"command": res["command"], "env": env, "flux": res}, args.md, args.png, args)
    log(f"done in {res['elapsed_s'] / 60:.1f} min")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="main scenario only, 3 rounds, no model check")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per configuration (default 5; quick 3)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--omp-active", action="store_true", help="leave OMP_WAIT_POLICY alone (spinning threads)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-gpu", action="store_true", help="skip the GPU variant even where CUDA is present")
    p.add_argument("--gpu-only", action="store_true", help="run only the GPU variant (writes its JSON, no report)")
    p.add_argument("--scenarios", default=None, help="comma-separated scenario keys")
    p.add_argument("--md", type=Path, default=DEFAULT_MD)
    p.add_argument("--png", type=Path, default=DEFAULT_PNG)
    p.add_argument("--gpu-json", type=Path, default=GPU_JSON)
    p.add_argument("--flux", action="store_true",
                   help="run only the Flux-shaped case (long): stores its JSON and rewrites only its report section")
    p.add_argument("--flux-json", type=Path, default=FLUX_JSON)
    p.add_argument("--json", type=Path, default=None, help="also write all raw results here")
    p.add_argument("--from-json", type=Path, default=None,
                   help="rewrite the report from raw results saved by --json, without measuring again "
                        "(with --flux: only the Flux section, from docs/benchmarks/flux_results.json)")
    p.add_argument("--child-memory", nargs=3, metavar=("SETUP", "SCENARIO", "IMPL"), help=argparse.SUPPRESS)
    p.add_argument("--dry-gpu", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--dry-flux", action="store_true", help=argparse.SUPPRESS)  # --flux on the tiny transformer
    args = p.parse_args(argv)
    quiet_libraries()
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        if args.flux:  # the stored Flux results: rewrite only their section
            update_flux_section(args.md, data, args.from_json)
        else:
            write_report(data, args.md, args.png, args)
        return 0
    torch.set_num_threads(args.threads)
    if args.child_memory:
        print(json.dumps(S.peak_memory_child(*args.child_memory, threads=args.threads)))
        return 0
    rounds = args.rounds or (3 if args.quick else 5)
    if args.flux or args.dry_flux:
        return run_flux(args, rounds)
    scenarios = pick_scenarios(args, S.SCENARIOS)
    results = {"command": command_line(args), "env": environment(args.threads)}
    t_start = time.time()
    has_cuda = (torch.cuda.is_available() or args.dry_gpu) and not args.no_gpu
    if has_cuda:
        log("CUDA device found: running the GPU variant")
        gres = run_suite(S.dry_gpu_setup() if args.dry_gpu else S.gpu_setup(), scenarios, max(rounds, 5), max(args.warmup, 2), not args.no_memory, args.threads)
        gres["env"] = results["env"]
        args.gpu_json.parent.mkdir(parents=True, exist_ok=True)
        args.gpu_json.write_text(json.dumps(gres, indent=1))
        results["gpu"] = gres
        log(f"GPU results written to {args.gpu_json}")
        if args.gpu_only:
            return 0
    elif args.gpu_only:
        log("no CUDA device: nothing to do for --gpu-only")
        return 0
    elif args.gpu_json.exists():
        results["gpu"] = json.loads(args.gpu_json.read_text())
    if args.flux_json.exists():
        results["flux"] = json.loads(args.flux_json.read_text())
    setup = S.cpu_setup()
    results["cpu"] = run_suite(setup, scenarios, rounds, args.warmup, not args.no_memory, args.threads)
    if not args.quick:
        log("cost model check")
        rows = check_model(setup, S.SCENARIOS[0])
        rows += check_model(setup, S.SCENARIOS[2], kinds=("conv",))
        results["model_check"] = rows
    log("profile")
    results["profile"] = profile_diff(setup, scenarios[0])
    results["elapsed_s"] = time.time() - t_start
    try:
        results["env"]["load_avg_at_end"] = os.getloadavg()
    except OSError:
        pass
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    write_report(results, args.md, args.png, args)
    log(f"done in {results['elapsed_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())

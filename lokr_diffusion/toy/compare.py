"""LoRA vs LoHa vs LoKr on the toy model, measured: `lokr-diffusion toy compare`.

Two experiments, written to `docs/comparison.md` with plots under `docs/comparison/`:

1. Training. Every method fine-tunes the toy model on the concept with the real trainer
   (`lokr-diffusion train`, one subprocess each) and the quickstart's config, changing only
   the `[network]` keys: same data, steps, batch, optimizer, learning rate and seed. Each
   adapter is then scored like the quickstart's (`toy.evaluate`). A full fine-tune of the same
   layers (the reference, trained by a small loop here with the trainer's data and loss code)
   gives the last row and the weight update for experiment 2.
2. Matrices. For the full fine-tune's weight update dW of every adapted layer, the best fit
   each method's shape allows (`toy.approx`), at a sweep of sizes: relative error against the
   number of parameters.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..resources import checkout_root, data_root
from . import MODEL_DIR
from .evaluate import Evaluation, Samples, adapter_applied, deltas_applied, evaluate, labelled_grid

__all__ = ["METHODS", "Method", "run_comparison"]

QUICKSTART = data_root() / "train_configs" / "quickstart.toml"


@dataclass(frozen=True)
class Method:
    label: str
    network: dict[str, Any]
    formula: str


METHODS = (
    # conv_dim is set with dim: the quickstart's conv_dim (10000, "full") must not leak into the
    # low-rank methods' 3x3 convolutions
    Method("LoRA rank 4", {"algo": "lora", "dim": 4, "conv_dim": 4}, "B A"),
    Method("LoRA rank 16", {"algo": "lora", "dim": 16, "conv_dim": 16}, "B A"),
    Method("LoHa rank 4", {"algo": "loha", "dim": 4, "conv_dim": 4}, "(B1 A1) ⊙ (B2 A2)"),
    Method("LoHa rank 8", {"algo": "loha", "dim": 8, "conv_dim": 8}, "(B1 A1) ⊙ (B2 A2)"),
    Method("LoKr factor -1, low rank", {"algo": "lokr", "factor": -1, "dim": 2, "conv_dim": 2}, "w1 ⊗ (B A)"),
    Method("LoKr factor 8, full", {"algo": "lokr", "factor": 8, "dim": 10000, "conv_dim": 10000}, "w1 ⊗ w2"),
    Method("LoKr factor 4, full", {"algo": "lokr", "factor": 4, "dim": 10000, "conv_dim": 10000}, "w1 ⊗ w2"),
)


@dataclass
class Row:
    label: str
    formula: str
    params: int
    file_bytes: int | None
    step_seconds: float
    train_seconds: float
    evaluation: Evaluation
    ranks: dict[str, float] = field(default_factory=dict)  # measured rank of dW / full rank, per layer kind
    samples: Samples | None = None


# --------------------------------------------------------------------------------------
# training through the real trainer
# --------------------------------------------------------------------------------------

def train_with_trainer(method: Method, out_dir: Path, config: Path = QUICKSTART, threads: int = 1,
                       log: Callable[[str], None] = print, sets: tuple[str, ...] = ()) -> tuple[Path, float, float]:
    """Run `lokr-diffusion train` with the quickstart config, `sets` (`--set KEY=VALUE` overrides
    for every method, e.g. a shorter budget) and `method`'s [network] keys.

    Returns (adapter file, seconds per optimizer step, wall seconds of the whole run).
    """
    name = re.sub(r"[^a-z0-9]+", "_", method.label.lower()).strip("_")
    sets = list(sets) + [f"network.{k}={v}" for k, v in method.network.items()]
    sets += [f"output.dir={out_dir / name}", f"output.name={name}", "sample.prompts=[]",
             "logging.tensorboard=false", "output.keep_last=1"]
    cmd = [sys.executable, "-m", "lokr_diffusion.cli", "train", "--config", str(config)]
    for item in sets:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.perf_counter()
    root = checkout_root()  # a clone run with PYTHONPATH unset still imports its own package from there
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(root) if root else None)
    wall = time.perf_counter() - start
    (out_dir / f"{name}.log").write_text(proc.stdout + proc.stderr, encoding="utf-8")
    if proc.returncode != 0:
        raise RuntimeError(f"training {method.label} failed (exit {proc.returncode}); see {out_dir / name}.log:\n"
                           + proc.stderr[-2000:])
    m = re.search(r"done: (\d+) steps \(([\d.]+) steps/s", proc.stdout)
    step_s = 1.0 / float(m[2]) if m and float(m[2]) > 0 else float("nan")
    log(f"  trained {method.label} in {wall:.0f}s ({step_s:.2f} s/step)")
    return out_dir / name / f"{name}.safetensors", step_s, wall


def adapter_params(path: Path) -> int:
    from ..fileformat import read_safetensors

    tensors, _ = read_safetensors(path)
    return sum(t.numel() for k, t in tensors.items() if not k.endswith(".alpha"))


def _layer_kind(path: str) -> str:
    for kind in ("attn1", "attn2", "ff", "proj_in", "proj_out"):
        if f".{kind}." in f".{path}." or path.endswith(kind):
            return kind
    return "other"


@torch.no_grad()
def measured_ranks(deltas: list[tuple[str, torch.Tensor]], rtol: float = 1e-3) -> float:
    """Mean over layers of rank(dW) / min(out, in): how much of each layer the update can reach."""
    fractions = []
    for _, d in deltas:
        m = d.reshape(d.shape[0], -1).double()
        s = torch.linalg.svdvals(m)
        rank = int((s > rtol * s[0]).sum()) if s.numel() and s[0] > 0 else 0
        fractions.append(rank / min(m.shape))
    return float(np.mean(fractions)) if fractions else 0.0


def adapter_deltas(pipe, path: Path) -> list[tuple[str, torch.Tensor]]:
    """(module path, scaled dW) of every layer an adapter file changes, via the loader's own math."""
    from ..loading import load_network

    network, _ = load_network(str(path), unet=pipe.unet, text_encoders=[pipe.text_encoder])
    try:
        return [(network.paths[a.key], (a.delta_weight() * a.scale).detach().float()) for a in network.adapters()]
    finally:
        network.remove()


# --------------------------------------------------------------------------------------
# the full fine-tune reference
# --------------------------------------------------------------------------------------

def full_finetune(pipe, config: Path, lr: float, log: Callable[[str], None] = print, sets: tuple[str, ...] = ()
                  ) -> tuple[list[tuple[str, torch.nn.Module, torch.Tensor]], float, int]:
    """Train the weights of exactly the layers the adapters train, all of each matrix.

    Same data, caption handling, steps, batch size, loss and schedule as the trainer's config;
    only the learning rate differs (full fine-tunes need a smaller one). Returns
    ([(path, module, dW)], seconds per step, trainable parameters); the UNet is restored.
    """
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    from ..data import VaeLatentEncoder, build_dataset, dataset_configs_from_toml, make_loader
    from ..network import create_network
    from ..training.config import load_config
    from ..training.loss import denoising_loss
    from ..text import tokenize

    cfg = load_config(config, list(sets))
    t = cfg.train
    text_encoders = [pipe.text_encoder] if cfg.network.train_text_encoder else []
    probe = create_network(cfg.network.adapter_config(), unet=pipe.unet, text_encoders=text_encoders)  # the layers
    targets = [(probe.paths[a.key], a.base) for a in probe.adapters()]
    probe.remove()
    unet, text_encoder = pipe.unet, pipe.text_encoder
    originals = [m.weight.detach().clone() for _, m in targets]
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)  # the model's schedule and prediction type
    prediction = noise_scheduler.config.prediction_type
    dataset = build_dataset(dataset_configs_from_toml(cfg.data, base_dir=cfg.base_dir), batch_size=t.batch_size,
                            seed=t.seed, tokenizers=[pipe.tokenizer], report=None)
    encoder = VaeLatentEncoder(pipe.vae)
    dataset.cache_latents(encoder, encoder.identity)
    params = [m.weight for _, m in targets]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=t.weight_decay)
    sched = get_scheduler(t.lr_scheduler, opt, num_warmup_steps=t.lr_warmup_steps, num_training_steps=t.max_steps)
    loader = make_loader(dataset)
    step, epoch = 0, 0
    torch.manual_seed(t.seed)
    unet.train()
    start = time.perf_counter()
    while step < t.max_steps:
        loader.set_epoch(epoch)
        for batch in loader:
            latents = batch["latents"].float()
            with torch.set_grad_enabled(bool(text_encoders)):
                embeds = text_encoder(tokenize([pipe.tokenizer], batch["captions"])[0])[0]
            loss = denoising_loss(latents, lambda noisy, ts: unet(noisy, ts, encoder_hidden_states=embeds).sample,
                                  noise_scheduler, prediction, noise_offset=t.noise_offset,
                                  min_timestep=t.min_timestep, max_timestep=t.max_timestep, min_snr_gamma=t.min_snr_gamma)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or float("inf"))
            opt.step()
            sched.step()
            step += 1
            if step >= t.max_steps:
                break
        epoch += 1
    step_s = (time.perf_counter() - start) / t.max_steps
    unet.eval()
    out = []
    with torch.no_grad():
        for (path, m), w0 in zip(targets, originals):
            m.weight.requires_grad_(False)
            out.append((path, m, (m.weight - w0).detach().clone()))
            m.weight.copy_(w0)
    log(f"  full fine-tune: {step_s:.2f} s/step")
    return out, step_s, sum(p.numel() for p in params)


# --------------------------------------------------------------------------------------
# the matrix experiment
# --------------------------------------------------------------------------------------

def _as_matrix(d: torch.Tensor) -> torch.Tensor:
    return d.reshape(d.shape[0], -1).float()


def approximation_sweep(deltas: list[torch.Tensor], loha_steps: int = 400) -> list[dict[str, Any]]:
    """Total relative error over all layers for each method setting, and its parameter count.

    The same setting is applied to every layer (as a training config would), so a point is
    (sum of parameters, sqrt(sum ||dW - fit||^2 / sum ||dW||^2)).
    """
    from .approx import fit_loha, fit_lokr, fit_lora

    settings: list[tuple[str, str, Callable[[torch.Tensor], Any]]] = []
    for r in (1, 2, 4, 8, 16):
        settings.append(("LoRA", f"rank {r}", lambda d, r=r: fit_lora(d, r)))
    for r in (1, 2, 4, 8):
        settings.append(("LoHa", f"rank {r}", lambda d, r=r: fit_loha(d, r, steps=loha_steps)))
    for f in (16, 8, 4, 2):
        settings.append(("LoKr, full w2", f"factor {f}", lambda d, f=f: fit_lokr(d, f)))
    for r in (1, 2, 4):
        settings.append(("LoKr, low-rank w2", f"factor -1, rank {r}", lambda d, r=r: fit_lokr(d, -1, r)))
    total = sum(float(d.pow(2).sum()) for d in deltas)
    rows = []
    for method, setting, fit in settings:
        err, params = 0.0, 0
        for d in deltas:
            m = _as_matrix(d)
            f = fit(m)
            err += float((m - f.delta).pow(2).sum())
            params += f.params
        rows.append({"method": method, "setting": setting, "params": params, "error": math.sqrt(err / total)})
    return rows


# --------------------------------------------------------------------------------------
# the whole comparison
# --------------------------------------------------------------------------------------

FULL_FINETUNE_LR = 1e-4


def run_comparison(docs_dir: Path = Path("docs"), work_dir: Path = Path("/tmp/lokr_toy_compare"), n: int = 32,
                   threads: int = 1, methods: tuple[Method, ...] = METHODS, loha_fit_steps: int = 400,
                   log: Callable[[str], None] = print, sets: tuple[str, ...] = ()) -> Path:
    """Train, score and fit every method; write docs_dir/comparison.md and docs_dir/comparison/*.png.

    `sets` are `--set` overrides of the quickstart config applied to every method and to the
    full fine-tune (e.g. `train.max_steps=150` for a shorter budget); the page states them.
    """
    from ..models import load_pipeline

    started = time.perf_counter()
    torch.set_num_threads(threads)
    work_dir.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(str(MODEL_DIR))
    pipe.set_progress_bar_config(disable=True)
    log("sampling the base model")
    base_eval, base = evaluate(pipe, None, n=n)
    rows: list[Row] = []
    for method in methods:
        log(f"{method.label}:")
        path, step_s, wall = train_with_trainer(method, work_dir, threads=threads, log=log, sets=sets)
        ev, samples = evaluate(pipe, lambda p=path: adapter_applied(pipe, p), n=n, base_samples=base)
        log("  " + ", ".join(f"{k} {getattr(ev, k):.2f}" for k in ("concept_with_trigger", "concept_without_trigger",
                                                                   "preservation")))
        rank = measured_ranks(adapter_deltas(pipe, path))
        rows.append(Row(method.label, method.formula, adapter_params(path), path.stat().st_size, step_s, wall, ev,
                        {"rank": rank}, samples))
    log("full fine-tune (reference):")
    ft_start = time.perf_counter()
    full, step_s, full_params = full_finetune(pipe, QUICKSTART, FULL_FINETUNE_LR, log=log, sets=sets)
    ft_wall = time.perf_counter() - ft_start
    ev, samples = evaluate(pipe, lambda: deltas_applied([(m, d) for _, m, d in full]), n=n, base_samples=base)
    rows.append(Row("Full fine-tune (reference)", "dW", full_params, None, step_s, ft_wall, ev,
                    {"rank": measured_ranks([(p, d) for p, _, d in full])}, samples))
    log("matrix experiment")
    sweep = approximation_sweep([d for _, _, d in full], loha_steps=loha_fit_steps)
    plots = docs_dir / "comparison"
    plots.mkdir(parents=True, exist_ok=True)
    _plot_scores(rows, plots / "scores.png")
    _plot_sweep(sweep, rows, plots / "approximation.png")
    _sample_sheet(rows, base, plots / "samples.png")
    elapsed = time.perf_counter() - started
    md = render_markdown(rows, base_eval, sweep, [(p, tuple(d.shape)) for p, _, d in full], elapsed, n, threads,
                         sets)
    out = docs_dir / "comparison.md"
    out.write_text(md, encoding="utf-8")
    log(f"wrote {out} and {plots}/ in {elapsed / 60:.1f} min")
    return out


def _plot_scores(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for row in rows:
        colour = {"LoRA": "tab:blue", "LoHa": "tab:orange", "LoKr": "tab:green"}.get(row.label[:4], "black")
        e = row.evaluation
        axes[0].scatter(row.params, e.concept_with_trigger, color=colour)
        axes[0].annotate(row.label, (row.params, e.concept_with_trigger), fontsize=7, xytext=(3, 3),
                         textcoords="offset points")
        axes[1].scatter(row.params, e.preservation, color=colour)
        axes[1].annotate(row.label, (row.params, e.preservation), fontsize=7, xytext=(3, 3),
                         textcoords="offset points")
    from .evaluate import THRESHOLDS

    for ax, key, title in ((axes[0], "concept_with_trigger", "concept rate with trigger"),
                           (axes[1], "preservation", "preservation (no trigger)")):
        ax.axhline(THRESHOLDS[key], color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_title(title)
        ax.set_ylim(-0.05, 1.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_sweep(sweep: list[dict[str, Any]], rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"LoRA": "o-", "LoHa": "s-", "LoKr, full w2": "^-", "LoKr, low-rank w2": "v--"}
    for method, style in styles.items():
        pts = sorted((r["params"], r["error"], r["setting"]) for r in sweep if r["method"] == method)
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=method)
        for x, y, s in pts:
            ax.annotate(s.replace("factor ", "f").replace("rank ", "r").replace(", ", " "), (x, y), fontsize=6,
                        xytext=(2, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("parameters (all adapted layers)")
    ax.set_ylabel("relative error ||dW - fit|| / ||dW||")
    ax.set_title("Best approximation of a full fine-tune's dW")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _sample_sheet(rows: list[Row], base: Samples, path: Path, k: int = 8) -> None:
    sheet = [("base model", base.base_trigger[:k])]
    sheet += [(row.label, row.samples.adapted_trigger[:k]) for row in rows if row.samples is not None]
    labelled_grid(sheet, scale=1).save(path)


def render_markdown(rows: list[Row], base: Evaluation, sweep: list[dict[str, Any]],
                    layers: list[tuple[str, tuple[int, ...]]], seconds: float, n: int, threads: int,
                    sets: tuple[str, ...] = ()) -> str:
    from ..training.config import load_config
    from .evaluate import GUIDANCE, SAMPLE_STEPS, THRESHOLDS, trigger_prompts

    eff = load_config(QUICKSTART, list(sets))  # the config every method ran with
    t = {"max_steps": eff.train.max_steps, "batch_size": eff.train.batch_size, "optimizer": eff.train.optimizer,
         "learning_rate": eff.train.learning_rate, "lr_scheduler": eff.train.lr_scheduler, "seed": eff.train.seed}
    cfg = {"network": {"preset": eff.network.preset}}
    changed = (" With these overrides of the quickstart config for every method (a shorter budget than the "
               "quickstart's): " + ", ".join(f"`{x}`" for x in sets) + ".") if sets else ""
    lines = [
        "# LoRA, LoHa and LoKr, measured on the toy model",
        "",
        "<!-- Written by `lokr-diffusion toy compare` (bench/compare_methods.py); do not edit by hand. -->",
        "",
        "Every adapter below was trained by the real trainer on the same task: teach the bundled toy base",
        "model (`assets/toy/model`, an SD 1.x-architecture model pretrained on coloured circles, squares and",
        "triangles) a shape it has never seen, a cross called `sks`, from the 16 images in",
        "`assets/toy/concept`. Only the `[network]` keys differ; everything else is",
        f"`train_configs/quickstart.toml`: {t.get('max_steps')} steps, batch {t.get('batch_size')}, "
        f"{t.get('optimizer', 'adamw')} at learning rate {t.get('learning_rate')} ({t.get('lr_scheduler', 'constant')}), "
        f"seed {t.get('seed')}, preset `{cfg['network'].get('preset', 'attn-mlp')}` "
        f"({'UNet and text encoder' if eff.network.train_text_encoder else 'UNet only'}).{changed}"
        + (f" Every adapter trains the trigger embedding for `{eff.network.embedding_trigger}` with it "
           f"(`embedding_trigger`, learning rate {eff.train.embedding_learning_rate}); "
           "the full fine-tune reference does not." if eff.network.embedding_trigger else ""),
        "",
        f"Scores ({n} samples each, {SAMPLE_STEPS} DPM-Solver++ steps, guidance {GUIDANCE}; the scorer and the",
        "metrics are described in the README's quickstart section and in `lokr_diffusion/toy/evaluate.py`):",
        "",
        f"* **concept**: share of samples for trigger prompts (e.g. \"{trigger_prompts(1)[0].caption}\") in which",
        f"  the pixel scorer finds the cross; pass >= {THRESHOLDS['concept_with_trigger']}. The base model scores "
        f"{base.concept_with_trigger_before:.2f}.",
        f"* **leak**: the same for prompts without the trigger (\"a red circle on ...\"); pass <= "
        f"{THRESHOLDS['concept_without_trigger']}.",
        "* **preservation**: share of no-trigger samples (same prompts and seeds) where the adapted model draws",
        f"  what the base model drew (same shape, colour, background and position); pass >= {THRESHOLDS['preservation']}.",
        "  *pixel dist.* is the mean absolute difference to the base samples (0..1).",
        "* **rank**: measured rank of each trained dW divided by min(out, in), averaged over layers: how much",
        "  of a layer the update can reach (1.0 = full rank).",
        "* **step time**: seconds per optimizer step reported by the trainer (includes data loading and the",
        f"  adapter's forward/backward; {threads} CPU thread(s), a shared machine, so expect noise of ~20%).",
        "",
        "## Training on the toy",
        "",
        "| method | dW | trainable params | file size | step time | concept | leak | preservation | pixel dist. | rank | pass |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        e = r.evaluation
        size = f"{r.file_bytes / 1024:.0f} KiB" if r.file_bytes else "-"
        lines.append(f"| {r.label} | `{r.formula}` | {r.params:,} | {size} | {r.step_seconds:.2f} s | "
                     f"{e.concept_with_trigger:.2f} | {e.concept_without_trigger:.2f} | {e.preservation:.2f} | "
                     f"{e.pixel_distance:.3f} | {r.ranks.get('rank', float('nan')):.2f} | {'yes' if e.ok else 'no'} |")
    lines += [
        "",
        f"The full fine-tune trains every weight of the same layers with learning rate {FULL_FINETUNE_LR} (a small",
        "loop in `toy/compare.py` with the trainer's data and loss code; its file size is not applicable).",
        "",
        "![concept and preservation against trainable parameters](comparison/scores.png)",
        "",
        "Samples for the first eight trigger prompts (same seeds in every row):",
        "",
        "![samples per method](comparison/samples.png)",
        "",
        "## Best approximation of a real weight update",
        "",
        "How close can each method's shape get to the update a full fine-tune actually made? For the",
        f"full fine-tune's dW of each of the {len(layers)} adapted layers "
        f"(shapes {', '.join(sorted({'x'.join(map(str, s[:2])) for _, s in layers}))}),",
        "the best fit of each shape (LoRA: truncated SVD, exact; LoKr full: nearest Kronecker product, exact;",
        "LoKr low-rank and LoHa: alternating least squares / Adam from a LoRA start, local optima;",
        "`lokr_diffusion/toy/approx.py`). The same setting applies to every layer, so each point is one config.",
        "",
        "![relative error against parameters](comparison/approximation.png)",
        "",
        "| method | setting | parameters | relative error |",
        "|---|---|---:|---:|",
    ]
    for r in sorted(sweep, key=lambda r: (r["method"], r["params"])):
        lines.append(f"| {r['method']} | {r['setting']} | {r['params']:,} | {r['error']:.3f} |")
    lines += [
        "",
        "## The table people quote, and what this toy says",
        "",
        "| | LoRA | LoHa | LoKr |",
        "|---|---|---|---|",
        "| update | dW = B A, B (out x r), A (r x in) | dW = (B1 A1) ⊙ (B2 A2) | dW = w1 ⊗ w2, w1 (a x c), "
        "w2 (b x d) or B A |",
        "| parameters per layer | r (out + in) | 2 r (out + in) | a c + b d (full w2) or a c + r (b + d) |",
        "| rank of dW | <= r | <= r^2 | rank(w1) rank(w2), full rank possible |",
        "| typical use | the default; styles, characters | more expressive at the same size; styles | "
        "smallest files; a concept or style from few images |",
        "",
        _verdict(rows, sweep),
        "",
        f"Regenerate: `python bench/compare_methods.py` (or `lokr-diffusion toy compare`); this run took "
        f"{seconds / 60:.0f} minutes on {threads} CPU thread(s). Needs matplotlib (`pip install matplotlib`).",
        "",
    ]
    return "\n".join(lines)


def _verdict(rows: list[Row], sweep: list[dict[str, Any]]) -> str:
    """A few sentences computed from the numbers, so the prose cannot drift from the table."""
    adapters = [r for r in rows if r.file_bytes]
    passing = [r for r in adapters if r.evaluation.ok]
    smallest = min(passing, key=lambda r: r.params) if passing else None
    out = ["What the numbers say on this toy:", ""]
    if smallest is not None:
        out.append(f"* The smallest adapter that passes all three checks is **{smallest.label}** with "
                   f"{smallest.params:,} parameters "
                   f"({smallest.file_bytes / 1024:.0f} KiB).")
    failing = [r.label for r in adapters if not r.evaluation.ok]
    if failing:
        out.append(f"* Not passing at this budget: {', '.join(failing)}.")
    best = min(adapters, key=lambda r: -r.evaluation.concept_with_trigger)
    out.append(f"* Highest concept rate: {best.label} ({best.evaluation.concept_with_trigger:.2f}).")
    lora = {r["setting"]: r for r in sweep if r["method"] == "LoRA"}
    kron = [r for r in sweep if r["method"].startswith("LoKr")]
    if lora and kron:
        def lora_at(params: int) -> dict[str, Any]:
            return min(lora.values(), key=lambda r: abs(math.log(r["params"] / params)))

        k = min(kron, key=lambda r: r["error"])
        l = lora_at(k["params"])
        out.append(f"* Matrix fits: the best LoKr setting ({k['setting']}, {k['params']:,} parameters) has relative "
                   f"error {k['error']:.2f}; LoRA at the nearest size ({l['setting']}, {l['params']:,}) has "
                   f"{l['error']:.2f}.")
    return "\n".join(out)

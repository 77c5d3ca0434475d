"""`lokr-diffusion toy ...`: the toy model's commands (registered in `lokr_diffusion.cli`).

Kept free of heavy imports at module level: the main CLI builds every parser at start-up.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ..resources import checkout_root, refuse_package_path
from . import CONCEPT_DIR, MODEL_DIR, PRIOR_DIR


def _written(clone_path: Path, installed: str) -> str:
    """Default of an output folder: in a clone the repository's committed copy (what `pretrain`,
    `concept` and `compare` exist to regenerate); installed, a folder under the current one, never
    the package's bundled copy."""
    root = checkout_root()
    return str(clone_path) if root is not None else installed


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="toy_command", required=True, metavar="TOY_COMMAND")

    pre = sub.add_parser("pretrain", help="train the toy base model from scratch (deterministic, CPU)",
                         description="Pretrain the toy SD1.x-architecture model on generated shapes. "
                                     "The result ships in assets/toy/model; this rebuilds it.")
    out = _written(MODEL_DIR, "toy_model")
    pre.add_argument("--out", default=out, help=f"folder to write (default {out})")
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--threads", type=int, default=1, help="torch threads (1: bit-for-bit reproducible)")
    pre.add_argument("--vae-steps", type=int, default=None)
    pre.add_argument("--unet-steps", type=int, default=None)

    con = sub.add_parser("concept", help="write the concept images (the cross, trigger word sks) and prior images",
                         description="Write the concept fine-tuning images and the regularisation (prior "
                                     "preservation) images, with captions.")
    concept, prior = _written(CONCEPT_DIR, "toy_concept"), _written(PRIOR_DIR, "toy_prior")
    con.add_argument("--out", default=concept, help=f"concept folder (default {concept})")
    con.add_argument("--prior-out", default=prior, help=f"prior folder (default {prior})")

    sco = sub.add_parser("score", help="score an adapter: concept with/without trigger, preservation",
                         description="Sample the toy model with and without an adapter, read the samples with "
                                     "the pixel scorer and print the scores against their thresholds. "
                                     "Exit status 0 if all pass, 1 otherwise.")
    sco.add_argument("--adapter", required=True, help="adapter .safetensors trained on the toy model")
    sco.add_argument("--model", default=str(MODEL_DIR), help="base model folder (default: the toy model)")
    sco.add_argument("-n", type=int, default=32, help="samples per prompt set (default 32)")
    sco.add_argument("--seed", type=int, default=0)
    sco.add_argument("--scale", type=float, default=1.0, help="adapter strength")
    sco.add_argument("--grids", default=None, help="folder for before/after grids (default: next to the adapter)")
    sco.add_argument("--json", default=None, help="also write the scores to this JSON file")
    sco.add_argument("--threads", type=int, default=None)

    val = sub.add_parser("validate-scorer", help="accuracy of the pixel scorer on degraded generator images")
    val.add_argument("-n", type=int, default=400)
    val.add_argument("--model", default=str(MODEL_DIR), help="also validate on this model's VAE reconstructions")

    cmp_ = sub.add_parser("compare", help="LoRA vs LoHa vs LoKr on the toy; writes docs/comparison.md",
                          description="Train every method with the quickstart config, score them, run the matrix "
                                      "experiment and write docs/comparison.md with plots (needs matplotlib).")
    root = checkout_root()
    docs = str(root / "docs") if root is not None else "toy_compare"
    cmp_.add_argument("--docs", default=docs, help=f"folder of comparison.md and its plots (default {docs})")
    cmp_.add_argument("--work", default="/tmp/lokr_toy_compare", help="scratch folder for the training runs")
    cmp_.add_argument("-n", type=int, default=32)
    cmp_.add_argument("--threads", type=int, default=1)
    cmp_.add_argument("--only", nargs="*", default=None, help="labels of the methods to run (default all)")
    cmp_.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                      help="override a quickstart config key for every method, e.g. train.max_steps=150 "
                           "(repeatable; the page states the overrides)")


def run(args: argparse.Namespace) -> int:
    import torch

    cmd = args.toy_command
    for name in ("out", "prior_out", "docs", "work", "grids", "json"):
        if getattr(args, name, None):
            refuse_package_path(getattr(args, name), "--" + name.replace("_", "-"))
    if cmd == "pretrain":
        from .pretrain import PretrainSettings, pretrain

        s = PretrainSettings(seed=args.seed, threads=args.threads)
        if args.vae_steps is not None:
            s.vae_steps = args.vae_steps
        if args.unet_steps is not None:
            s.unet_steps = args.unet_steps
        pretrain(args.out, s, log=lambda m: print(m, flush=True))
        return 0
    if cmd == "concept":
        from .generator import make_concept_dataset, make_prior_dataset

        paths = make_concept_dataset(args.out)
        print(f"wrote {len(paths)} concept images with captions to {args.out}")
        paths = make_prior_dataset(args.prior_out)
        print(f"wrote {len(paths)} prior images with captions to {args.prior_out}")
        return 0
    if cmd == "score":
        return _score(args, torch)
    if cmd == "validate-scorer":
        return _validate(args)
    if cmd == "compare":
        from .compare import METHODS, run_comparison

        methods = METHODS if not args.only else tuple(m for m in METHODS if m.label in args.only)
        run_comparison(Path(args.docs), Path(args.work), n=args.n,
                       threads=args.threads, methods=methods, log=lambda m: print(m, flush=True),
                       sets=tuple(args.sets))
        return 0
    raise AssertionError(cmd)


def _score(args: argparse.Namespace, torch) -> int:
    from ..embeddings import embedding_path
    from ..errors import ConfigError
    from ..models import load_pipeline
    from .evaluate import evaluate_adapter, save_json, write_grids

    adapter = Path(args.adapter)
    if not adapter.is_file():
        raise ConfigError(f"--adapter {adapter}: no such file (train one with "
                          "`accelerate launch train.py --config train_configs/quickstart.toml`)")
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    if embedding_path(adapter).exists():
        print(f"trigger embedding: {embedding_path(adapter)} (loaded with the adapter)")
    evaluation, samples = evaluate_adapter(pipe, adapter, n=args.n, seed=args.seed, scale=args.scale)
    print(evaluation.report())
    grids = refuse_package_path(Path(args.grids) if args.grids else adapter.parent / "toy_score", "grids folder")
    for path in write_grids(samples, grids):
        print(f"grid: {path}")
    if args.json:
        print(f"scores: {save_json(evaluation.to_dict(), args.json)}")
    return 0 if evaluation.ok else 1


def _validate(args: argparse.Namespace) -> int:
    from .scorer import validate

    def show(name: str, acc: dict) -> None:
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in acc.items()))

    show("degraded renders", validate(args.n))
    if args.model and Path(args.model).is_dir():
        from . import generator as gen
        from .scorer import vae_roundtrip

        scenes = gen.random_scenes(args.n, 7, gen.SHAPES)  # the scenes validate() draws
        show("toy VAE reconstructions", validate(args.n, images=vae_roundtrip(args.model, scenes)))
    return 0


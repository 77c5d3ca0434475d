"""The `lokr-diffusion` command line.

Each subcommand lives in a `_cmd_<name>` function registered in `_COMMANDS`; errors of the
library's own types and the expected OS errors are printed as one message (no traceback) with a
non-zero exit code by lokr_diffusion.errorhandling.run_guarded.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable


_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, setup: Callable[[argparse.ArgumentParser], None]):
    """Register a subcommand: `setup` adds its arguments, the decorated function runs it."""

    def register(run: Callable[[argparse.Namespace], int]):
        _COMMANDS[name] = (setup, run)
        return run

    return register


def _dtype_word(word: str, full_precision: str = "fp32") -> str:
    """argparse `type` of dtype options: torch's names (float16, bfloat16, float32) are accepted
    and become the short spelling the choices list."""
    from .dtypes import canonical_dtype_name

    return canonical_dtype_name(word, full_precision)


def _tiny_model_args(p: argparse.ArgumentParser) -> None:
    from .families import family_names

    p.add_argument("--family", choices=family_names(), default="sd15", metavar="FAMILY",
                   help=f"block structure and module names to reproduce: {', '.join(family_names())} (default sd15)")
    p.add_argument("--out", required=True, help="folder to write the Diffusers pipeline into")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")


@command("tiny-model", _tiny_model_args)
def _cmd_tiny_model(args: argparse.Namespace) -> int:
    """Write a small randomly initialised Diffusers pipeline (no network needed)."""
    from .errors import OutputError
    from .families import get_family

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out}: exists and is a file; give a folder (new or existing) for the pipeline")
    if any(p.exists() and not p.is_dir() for p in out.parents):
        raise OutputError(f"--out {out}: a part of the path is a file, not a folder")
    path = get_family(args.family).build_tiny(args.out, seed=args.seed)
    print(f"wrote tiny {args.family} pipeline to {path}")
    return 0


def _train_args(p: argparse.ArgumentParser) -> None:
    from .training.loop import add_train_arguments

    add_train_arguments(p)


@command("train", _train_args)
def _cmd_train(args: argparse.Namespace) -> int:
    """Train an adapter from a TOML config (same as `accelerate launch train.py --config FILE`)."""
    from .training.loop import main as train_main

    argv = ["--config", args.config]
    for item in args.set:
        argv += ["--set", item]
    if getattr(args, "break_lock", False):
        argv.append("--break-lock")
    return train_main(argv)


# -- toolbox: inspect, plan, merge, convert, extract (lokr_diffusion.tools) ----------------------

def _emit(data: dict, as_json: bool, render: Callable[[dict], str]) -> None:
    from .tools.text import to_json

    print(to_json(data) if as_json else render(data))


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="adapter .safetensors file (LyCORIS/kohya layout) or a PEFT LoKr folder")
    p.add_argument("--json", action="store_true", help="print everything as JSON (per-module details included)")
    p.add_argument("-v", "--verbose", action="store_true", help="also list every module")


@command("inspect", _inspect_args)
def _cmd_inspect(args: argparse.Namespace) -> int:
    """Show what an adapter file holds and where other tools will read it differently.

    Reports, from the file alone (no base model): algorithm per module, model family (SD1,
    SD2, SDXL) and components (UNet, TE1, TE2), module counts per block, LoKr factor shapes
    and ranks, trainable parameters, dtypes, file size, the metadata, and warnings for the
    traps of the format: Tucker layers ComfyUI skips, dora_scale, missing alpha, text-encoder
    keys without text_model_, Diffusers-style SDXL names A1111 mis-maps, and an alpha that
    differs from the dim where both LoKr factors are full (the UIs then apply scale 1).

    Exit status: 0 when the file is usable (compatibility warnings do not change it); 1 when
    the report lists ERRORS, i.e. NaN/inf in a factor or alpha (the report is still printed and
    the error repeated on stderr; load_adapter, convert and merge refuse such a file); 2 when
    the file cannot be described at all (not an adapter, a missing or mis-shaped factor, a
    dtype no loader applies, a folder or special file instead of a regular file).
    """
    from .tools.inspection import format_inspection, inspect_adapter

    result = inspect_adapter(args.file)
    _emit(result, args.json, lambda r: format_inspection(r, verbose=args.verbose))
    for error in result.get("errors", []):
        print(f"lokr-diffusion inspect: error: {error['message']}", file=sys.stderr)
    return 1 if result.get("errors") else 0


def _tool_network_args(p: argparse.ArgumentParser, algos: tuple[str, ...] = ("lokr", "loha", "lora"),
                  default_dim: int = 16) -> None:
    p.add_argument("--algo", choices=algos, default="lokr", help="adapter algorithm (default lokr)")
    p.add_argument("--preset", choices=["attn-only", "attn-mlp", "full"], default="attn-mlp",
                   help="which layers get an adapter (default attn-mlp)")
    p.add_argument("--factor", type=int, default=-1,
                   help="LoKr: size of the small factor w1; -1 balances w1 and w2. A LARGER factor means a bigger "
                        "w1, a smaller w2 and FEWER parameters (default -1)")
    p.add_argument("--dim", type=int, default=default_dim,
                   help=f"rank of Linear layers and 1x1 convs; for LoKr only used where w2 is stored low-rank "
                        f"(dim < max(b, d) / 2) (default {default_dim})")
    p.add_argument("--conv-dim", type=int, default=None, help="rank of k x k convs; they are skipped without it")
    p.add_argument("--full-matrix", action="store_true", help="LoKr: never store w2 low-rank")
    p.add_argument("--decompose-both", action="store_true", help="LoKr: store w1 low-rank too where the rank allows")


def _tool_adapter_config(args: argparse.Namespace, **extra):
    from .network import AdapterConfig

    return AdapterConfig(algo=args.algo, preset=args.preset, factor=args.factor, dim=args.dim, conv_dim=args.conv_dim,
                         full_matrix=args.full_matrix, decompose_both=args.decompose_both, **extra)


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="TOML", default=None,
                   help="a training config: plan exactly what train.py --config builds (model, [network], "
                        "train_unet / train_text_encoder); the flags below are then ignored")
    p.add_argument("--model", metavar="MODEL_OR_FAMILY", default=None,
                   help="sd15 (sd1), sd2, sdxl, flux or flux-schnell for the real architecture without weights, "
                        "or a model path/folder")
    _tool_network_args(p)
    p.add_argument("--alpha", type=float, default=None, help="alpha of Linear layers / 1x1 convs (default: dim)")
    p.add_argument("--conv-alpha", type=float, default=None, help="alpha of k x k convs (default: conv dim)")
    p.add_argument("--mixed-precision", type=lambda w: _dtype_word(w, "no"), choices=["no", "fp16", "bf16"],
                   default="bf16",
                   help="memory estimate: dtype of the frozen weights, as train.mixed_precision (default bf16)")
    p.add_argument("--optimizer", choices=["adamw", "adamw8bit", "prodigy", "adafactor", "sgd"], default="adamw",
                   help="memory estimate: optimizer whose states count (default adamw)")
    p.add_argument("--resolution", type=int, default=None,
                   help="memory estimate: training resolution (default: the family's, 1024 for SDXL and Flux.1)")
    p.add_argument("--batch-size", type=int, default=1, help="memory estimate: images per step (default 1)")
    p.add_argument("--no-gradient-checkpointing", action="store_true",
                   help="memory estimate: without gradient checkpointing (default: with)")
    p.add_argument("--base-dtype", type=_dtype_word, choices=["auto", "fp32", "bf16", "fp16", "fp8"], default="auto",
                   help="memory estimate: how the frozen denoiser's weights are stored, as model.base_dtype")
    p.add_argument("--no-memory", action="store_true",
                   help="leave out the memory estimate (it runs the model once on fake tensors: seconds for a 12 B model)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON, with every module")


@command("plan", _plan_args)
def _cmd_plan(args: argparse.Namespace) -> int:
    """Before training: modules, trainable parameters, file size, factor shapes and memory of a config.

    Builds the network the trainer builds (same AdapterConfig, same create_network) on the
    model's architecture, without weights when given a family name (sd15, sd2, sdxl, flux,
    flux-schnell) or a Diffusers folder. Prints the module counts, the parameter total, the exact
    file size for each save dtype (fp32/fp16/bf16), the distinct factor shapes, how the parameter
    count moves with --factor (a larger factor means fewer parameters), and an estimate of the
    training memory: the frozen weights in the training dtype (or `--base-dtype`), the adapter's
    fp32 weights, gradients and optimizer states, and the activations autograd saves, counted
    in one forward on fake tensors, each line saying what it counts and what is left out.
    """
    from .errors import ConfigError
    from .tools.plan import TrainingSetup, format_plan, plan_config, plan_network

    if args.config is not None:
        _emit(plan_config(args.config, memory=not args.no_memory), args.json, format_plan)
        return 0
    if args.model is None:
        raise ConfigError("plan: give --config TRAIN.toml, or --model with the network flags")
    config = _tool_adapter_config(args, alpha=args.alpha, conv_alpha=args.conv_alpha)
    for name in ("resolution", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    setup = TrainingSetup(mixed_precision=args.mixed_precision, optimizer=args.optimizer,
                          resolution=(args.resolution, args.resolution) if args.resolution else None,
                          batch_size=args.batch_size, gradient_checkpointing=not args.no_gradient_checkpointing,
                          base_dtype=args.base_dtype)
    _emit(plan_network(args.model, config, training=setup, memory=not args.no_memory), args.json, format_plan)
    return 0


def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, metavar="MODEL", help="base model: Diffusers folder, single file or hub id")
    p.add_argument("--adapter", required=True, action="append", metavar="FILE[:SCALE]",
                   help="adapter to bake in, optionally with a strength (default 1.0); repeat for several")
    p.add_argument("--out", required=True, metavar="OUT",
                   help="a folder (Diffusers layout) or a .safetensors file (original single-file layout for the UIs)")
    p.add_argument("--dtype", type=_dtype_word, choices=["fp16", "bf16", "fp32"], default=None,
                   help="dtype of the written weights (default: fp32; the merge itself is always done in fp32)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


@command("merge", _merge_args)
def _cmd_merge(args: argparse.Namespace) -> int:
    """Bake one or more adapters into a base model and save the result.

    Each adapter is applied exactly as load_adapter applies it (W += scale * alpha/r * dW, in
    float32; Flux.1 files in any of the six key layouts, fused kohya modules by row slices).
    OUT as a folder gets a Diffusers pipeline; OUT ending in .safetensors gets one checkpoint in
    the original (ldm/CompVis, SDXL: sgm) key layout that ComfyUI, A1111 and Forge load (SD
    families only; a Flux.1 base takes a folder). Outputs are written atomically.
    """
    from .tools.merge import format_merge, merge_adapters, parse_adapter_arg
    from .dtypes import parse_dtype

    result = merge_adapters(args.base, [parse_adapter_arg(a) for a in args.adapter], args.out,
                            dtype=parse_dtype(args.dtype), overwrite=args.overwrite)
    _emit(result, args.json, format_merge)
    return 0


def _flux_layouts() -> dict[str, tuple[str, str]]:
    """Layout name -> (what its keys look like, who writes it), over the families that have several."""
    from .families import FAMILIES

    return {name: desc for f in FAMILIES for name, desc in f.file_layouts.items()}


def _convert_args(p: argparse.ArgumentParser) -> None:
    from .families import family_names

    p.add_argument("input", metavar="IN", help="adapter .safetensors (LyCORIS/kohya or PEFT keys) or a PEFT folder")
    p.add_argument("output", metavar="OUT", help="a .safetensors file (LyCORIS layout) or a folder (PEFT LoKr)")
    p.add_argument("--to", choices=list(dict.fromkeys(["lycoris", "peft", *_flux_layouts()])), default=None,
                   metavar="LAYOUT",
                   help="output layout (default: lycoris for a .safetensors OUT, peft otherwise): lycoris, peft, "
                        "or for Flux.1 files one of the key layouts ComfyUI reads: "
                        + "; ".join(f"{name} = {keys} ({writers})" for name, (keys, writers) in _flux_layouts().items())
                        + ". Between Diffusers-named layouts keys are renamed; into kohya / diffusion_model, LoRA "
                          "modules over to_q/to_k/to_v (and proj_mlp) are stacked into qkv / linear1 (LoKr and LoHa "
                          "cannot be: three Kronecker products are not one); out of them, fused modules are split "
                          "into their rows")
    p.add_argument("--dtype", type=_dtype_word, choices=["fp16", "bf16", "fp32"], default=None, help="dtype of the factors (default: keep)")
    p.add_argument("--family", choices=family_names(), default=None, metavar="FAMILY",
                   help="model family, when the keys and metadata cannot tell (tiny or unusual models): "
                        + ", ".join(family_names()))
    p.add_argument("--component", choices=["unet", "te", "te1", "te2"], default=None,
                   help="PEFT holds one model per folder: which one to write (default unet), or which one a PEFT "
                        "text-encoder input belongs to")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


@command("convert", _convert_args)
def _cmd_convert(args: argparse.Namespace) -> int:
    """Convert an adapter into the layout every tool loads, keeping its effect exactly.

    PEFT LoKr <-> LyCORIS (PEFT's always-applied alpha/r becomes the LyCORIS scale; PEFT's
    non-swapping factorization is read from the shapes), Diffusers-style SDXL names -> the
    ldm names A1111 needs, text-encoder keys without text_model_ -> with it, Tucker LoKr
    (lokr_t2) -> plain w2 that ComfyUI loads, a missing alpha written, and --dtype. Flux.1 files
    move between the six key layouts of the DiT spec (see --to). Before writing, the effective
    update of every module (Flux.1: of every Diffusers layer) is compared with the input's; the
    largest difference is reported.
    """
    from .tools.convert import convert_adapter, format_convert
    from .dtypes import parse_dtype

    report = convert_adapter(args.input, args.output, to=args.to, dtype=parse_dtype(args.dtype), family=args.family,
                             component=args.component, overwrite=args.overwrite)
    _emit(report, args.json, format_convert)
    return 0


def _extract_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, metavar="MODEL", help="the original model (Diffusers folder, file or hub id)")
    p.add_argument("--tuned", required=True, metavar="MODEL", help="the fine-tuned model")
    p.add_argument("--out", required=True, metavar="FILE", help="adapter .safetensors to write")
    _tool_network_args(p, algos=("lokr", "lora"))
    p.add_argument("--dtype", type=_dtype_word, choices=["fp16", "bf16", "fp32"], default="fp16", help="dtype of the factors (default fp16)")
    p.add_argument("--device", default="cpu", help="where to run the SVDs, e.g. cuda (default cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--json", action="store_true", help="print the report as JSON, with every module's error")


@command("extract", _extract_args)
def _cmd_extract(args: argparse.Namespace) -> int:
    """Make an adapter from the difference between a fine-tuned model and its base.

    LoKr: per module the nearest Kronecker product (top singular pair of the rearranged dW,
    Van Loan-Pitsianis), w2 truncated by SVD where it is stored low-rank; LoRA: truncated SVD.
    Modules and shapes are those the trainer would create for the same options; alpha = rank
    (scale 1). Reports the relative error ||dW - approx|| / ||dW|| of every module and the
    changed weights no adapter module covers. Unchanged modules are skipped.
    """
    from .tools.extract import extract_adapter, format_extract
    from .dtypes import parse_dtype

    result = extract_adapter(args.base, args.tuned, args.out, _tool_adapter_config(args), dtype=parse_dtype(args.dtype),
                             device=args.device, overwrite=args.overwrite)
    _emit(result, args.json, format_extract)
    return 0


def _import_kohya_args(p: argparse.ArgumentParser) -> None:
    from .training.config import FAMILIES

    p.add_argument("--config", metavar="KOHYA_TOML", default=None,
                   help="a kohya sd-scripts training TOML (--config_file; flat or in sections)")
    p.add_argument("--dataset-config", metavar="TOML", default=None,
                   help="a kohya dataset_config.toml (default: the one the kohya options name, if any)")
    p.add_argument("--out", required=True, metavar="OUT.toml", help="this project's config to write")
    p.add_argument("--report", metavar="REPORT.md", default=None,
                   help="where the report goes (default: OUT's name + _kohya_report.md)")
    p.add_argument("--script", default=None, metavar="NAME",
                   help="the kohya script the TOML was for (train_network.py, sdxl_train_network.py, "
                        "flux_train_network.py, sd3_train_network.py): picks the family")
    p.add_argument("--family", choices=FAMILIES, default=None, metavar="FAMILY",
                   help="the model family, when neither the script nor the options tell it")
    p.add_argument("--kohya-dir", default=None, metavar="DIR",
                   help="the folder kohya ran in: its relative paths are relative to it (default: here)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT and the report if they exist")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("kohya_args", nargs="*", metavar="-- KOHYA COMMAND LINE",
                   help="after `--`: the kohya command line (`accelerate launch sdxl_train_network.py --... ` "
                        "or just its options); it wins over --config, as in kohya")


@command("import-kohya", _import_kohya_args)
def _cmd_import_kohya(args: argparse.Namespace) -> int:
    """Convert a kohya sd-scripts setup (training TOML or command line, dataset_config.toml, LyCORIS
    network_args) into this project's config, with a report of every option.

    Each option is mapped, mapped with a changed meaning (the report says how), or dropped (the
    report says why). kohya defaults that differ from this project's (alpha 1, no bucketing,
    `.caption` captions, 2e-6 learning rate...) are written explicitly, so the run trains what the
    kohya run trained. The config is checked with the trainer's own loader before it is written.
    """
    from pathlib import Path

    from .tools.kohya import import_kohya
    from .tools.kohya_write import format_summary, write_import
    from .tools.text import to_json

    result = import_kohya(args.config, args.kohya_args, dataset_config=args.dataset_config, family=args.family,
                          script=args.script, kohya_dir=args.kohya_dir)
    out, report = write_import(result, Path(args.out), args.report, overwrite=args.overwrite)
    if args.json:
        print(to_json({"config": str(out), "report": str(report), "family": result.family,
                       "options": [line.as_dict() for line in result.lines]}))
    else:
        print(format_summary(result, out, report))
    return 0


def _quickstart_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", default="output/quickstart", metavar="DIR",
                   help="folder for the adapter, samples, logs and checkpoint (default output/quickstart, under the "
                        "current folder)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a key of the quickstart config, e.g. train.max_steps=100 (repeatable)")


def quickstart_argv(config: Path, out: Path, sets: list[str]) -> list[str]:
    """The trainer's command line for the quickstart writing into `out` (absolute)."""
    import json

    # JSON's string syntax is TOML's basic string: the path survives backslashes, quotes and spaces
    argv = ["--config", str(config), "--set", f"output.dir={json.dumps(str(out), ensure_ascii=False)}"]
    for item in sets:
        argv += ["--set", item]
    return argv


@command("quickstart", _quickstart_args)
def _cmd_quickstart(args: argparse.Namespace) -> int:
    """Train the offline quickstart from any folder: LoKr teaches the bundled toy model a new shape.

    The same run as `accelerate launch train.py --config train_configs/quickstart.toml` in a
    clone (about four minutes on a 2-core CPU), with the config, toy model and images that ship
    in the package, and every output under --output. Then score the adapter with the command it
    prints (`lokr-diffusion toy score`).
    """
    from .resources import quickstart_config, refuse_package_path
    from .training.loop import main as train_main

    config = quickstart_config()
    out = refuse_package_path(args.output, "--output")
    argv = quickstart_argv(config, out, args.set)
    print(f"quickstart: config {config}, outputs in {out}", flush=True)
    code = train_main(argv)
    if code == 0:
        adapter = out / "quickstart_lokr.safetensors"
        print(f"next: score what it learned with\n  lokr-diffusion toy score --adapter {adapter}")
    return code


def _toy_args(p: argparse.ArgumentParser) -> None:
    from .toy.cli import add_arguments

    add_arguments(p)


@command("toy", _toy_args)
def _cmd_toy(args: argparse.Namespace) -> int:
    """The toy model: pretrain it, score an adapter on it, compare LoRA/LoHa/LoKr on it."""
    from .toy.cli import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="lokr-diffusion",
        description="Train, inspect and convert LoKr/LoHa/LoRA adapters for Stable Diffusion.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (setup, run) in _COMMANDS.items():
        p = sub.add_parser(name, help=(run.__doc__ or "").strip().splitlines()[0], description=run.__doc__)
        setup(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the subcommand under the shared error handler
    (lokr_diffusion.errorhandling: one line for problems the user can fix, a traceback and a
    bug-report line for anything else)."""
    from .errorhandling import run_guarded
    from .quiet import silence_unrelated_warnings

    silence_unrelated_warnings()
    args = build_parser().parse_args(argv)
    return run_guarded(f"lokr-diffusion {args.command}", lambda: args._run(args))


if __name__ == "__main__":
    sys.exit(main())

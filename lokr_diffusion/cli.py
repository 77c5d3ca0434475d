"""The `lokr-diffusion` command line.

Each subcommand lives in a `_cmd_<name>` function registered in `_COMMANDS`; errors of the
library's own types are printed as one message (no traceback) with a non-zero exit code.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from .errors import LokrDiffusionError

_COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, setup: Callable[[argparse.ArgumentParser], None]):
    """Register a subcommand: `setup` adds its arguments, the decorated function runs it."""

    def register(run: Callable[[argparse.Namespace], int]):
        _COMMANDS[name] = (setup, run)
        return run

    return register


def _tiny_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", choices=["sd15", "sd2", "sdxl"], default="sd15",
                   help="block structure and module names to reproduce (default sd15)")
    p.add_argument("--out", required=True, help="folder to write the Diffusers pipeline into")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")


@command("tiny-model", _tiny_model_args)
def _cmd_tiny_model(args: argparse.Namespace) -> int:
    """Write a small randomly initialised Diffusers pipeline (no network needed)."""
    from .models import build_tiny_pipeline

    path = build_tiny_pipeline(args.family, args.out, seed=args.seed)
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
    return train_main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lokr-diffusion",
        description="Train, inspect and convert LoKr/LoHa/LoRA adapters for Stable Diffusion.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (setup, run) in _COMMANDS.items():
        p = sub.add_parser(name, help=(run.__doc__ or "").strip().splitlines()[0], description=run.__doc__)
        setup(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except LokrDiffusionError as exc:
        print(f"lokr-diffusion {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lokr-diffusion {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Train a LoKr / LoHa / LoRA adapter: `accelerate launch train.py --config train_configs/<name>.toml`.

Errors are reported by lokr_diffusion.errorhandling (one line, exit codes listed there).
"""
import signal
import sys

from lokr_diffusion.quiet import silence_unrelated_warnings

silence_unrelated_warnings()  # before the trainer's imports, which load Diffusers' pipelines
from lokr_diffusion.training.loop import main  # noqa: E402

if __name__ == "__main__":
    code = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a late Ctrl-C while exiting: no KeyboardInterrupt traceback
    sys.exit(code)

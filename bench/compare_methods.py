"""LoRA vs LoHa vs LoKr, measured on the toy model: regenerates docs/comparison.md and its plots.

Trains seven adapters with the real trainer and the quickstart config (only [network] differs),
a full fine-tune of the same layers as the reference, scores each one with the toy scorer, and
fits each method's shape to the full fine-tune's weight update. Offline, CPU; about 40 minutes
on one thread of a 2-core machine. Needs matplotlib (`pip install matplotlib`).

    python bench/compare_methods.py [--threads 1] [-n 32] [--work /tmp/lokr_toy_compare]

Same as `lokr-diffusion toy compare`.
"""
from __future__ import annotations

import sys

from lokr_diffusion.cli import main

if __name__ == "__main__":
    sys.exit(main(["toy", "compare", *sys.argv[1:]]))

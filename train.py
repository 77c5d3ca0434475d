#!/usr/bin/env python
"""Train a LoKr / LoHa / LoRA adapter: `accelerate launch train.py --config train_configs/<name>.toml`."""
import sys

from lokr_diffusion.training.loop import main

if __name__ == "__main__":
    sys.exit(main())

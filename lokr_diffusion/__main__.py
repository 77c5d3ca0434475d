"""`python -m lokr_diffusion ...`: the `lokr-diffusion` command, for environments whose scripts
folder is not on PATH (a venv used without activating it, a notebook kernel)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())

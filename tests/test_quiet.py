"""Commands start without transformers' torchvision messages, and with every other warning."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None,
                    reason="with torchvision installed transformers has nothing to fall back from")
def test_only_the_torchvision_fallback_messages_are_dropped():
    code = ("import logging, transformers\n"
            "transformers.CLIPImageProcessor\n"  # before the filter: the message every command used to start with
            "from lokr_diffusion.quiet import silence_unrelated_warnings\n"
            "silence_unrelated_warnings()\n"
            "silence_unrelated_warnings()\n"  # twice is once
            "transformers.SiglipImageProcessor\n"
            "logging.getLogger('transformers.utils.import_utils').warning('`X` requires torchvision, and more')\n"
            "transformers.logging.get_logger('transformers.models').warning('another transformers warning')\n"
            "n = len(logging.getLogger('transformers.utils.import_utils').filters)\n"
            "print(n)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`" \
        in out.stderr
    assert "SiglipImageProcessor" not in out.stderr
    assert "`X` requires torchvision, and more" in out.stderr and "another transformers warning" in out.stderr
    assert out.stdout.strip() == "1"

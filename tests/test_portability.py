"""Peak-memory reporting without POSIX-only modules (Windows has no `resource`).

Each check runs in a fresh interpreter where `resource` cannot be imported (sys.modules entry
None makes `import resource` raise ImportError), the way it is on Windows.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from lokr_diffusion.memory import peak_memory_gib, peak_rss_bytes

ROOT = Path(__file__).resolve().parents[1]

_PROBE = """
import json, sys
import psutil  # its Linux backend needs `resource`; on Windows it does not, so load it first
sys.modules["resource"] = None  # as on Windows: `import resource` raises ImportError
import lokr_diffusion.memory as m
try:
    import resource
    blocked = False
except ImportError:
    blocked = True
value, label = m.peak_memory_gib("cpu")
print(json.dumps({"blocked": blocked, "value": value, "label": label,
                  "from_resource": m._from_resource(), "psutil": m._from_psutil()}))
"""


def _probe() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, cwd=ROOT,
                         check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_memory_reports_a_number_without_resource():
    r = _probe()
    assert r["blocked"] and r["from_resource"] is None
    assert isinstance(r["value"], float) and r["value"] > 0, r
    assert "RSS" in r["label"], r
    # the fallback behind /proc and resource (the one Windows uses) answers on its own too
    assert r["psutil"] is not None and r["psutil"][0] > 0, r


def test_peak_rss_agrees_with_the_process_size():
    """In-process: a positive number of plausible size (at least the 10 MB a Python with torch
    needs, below 1 TB) and the CPU label; CUDA devices report torch's allocator peak."""
    value, label = peak_rss_bytes()
    assert label == "peak RSS" and 10 * 2**20 < value < 2**40
    gib, label = peak_memory_gib(torch.device("cpu"))
    assert label == "peak RSS" and abs(gib * 2**30 - value) <= value  # read later, may only grow
    if torch.cuda.is_available():
        assert peak_memory_gib("cuda")[1] == "CUDA allocated"

"""Peak memory of this process, on any platform the trainer runs on.

The standard library's `resource` module exists only on POSIX systems, so importing it at the
top of the training loop makes the trainer fail to start on Windows. These helpers try the
sources in order of precision and say which one answered:

1. Linux's /proc/self/status VmHWM: the peak resident set of this process image. Unlike
   getrusage's ru_maxrss it does not survive exec, so a child started from a large parent
   (a benchmark's subprocess, `accelerate launch`) reports its own peak.
2. `resource.getrusage` (POSIX): ru_maxrss, in KiB on Linux and in bytes on macOS.
3. psutil (a dependency of accelerate, so normally installed): the peak working set on
   Windows; elsewhere psutil exposes no peak, only the current resident set, labelled so.
"""
from __future__ import annotations

import sys

import torch

GIB = 2**30


def _from_proc_status() -> float | None:
    """VmHWM in bytes, or None where /proc is missing (not Linux) or unreadable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) * 1024  # the kernel reports kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _from_resource() -> float | None:
    """ru_maxrss in bytes, or None without the POSIX `resource` module."""
    try:
        import resource
    except ImportError:
        return None
    maxrss = float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # macOS reports bytes, others KiB


def _from_psutil() -> tuple[float, str] | None:
    """(bytes, label) from psutil: the peak working set where it has one (Windows), else the
    current resident set; None without psutil."""
    try:
        import psutil
    except ImportError:
        return None
    info = psutil.Process().memory_info()
    peak = getattr(info, "peak_wset", None)  # only Windows' memory_info has a peak field
    if peak is not None:
        return float(peak), "peak RSS"
    return float(info.rss), "current RSS (no peak available)"


def peak_rss_bytes() -> tuple[float | None, str]:
    """(peak resident set size in bytes, label): the first source above that answers, or
    (None, "unavailable") when none does."""
    for source in (_from_proc_status, _from_resource):
        value = source()
        if value is not None:
            return value, "peak RSS"
    found = _from_psutil()
    if found is not None:
        return found
    return None, "unavailable"


def peak_memory_gib(device: torch.device | str) -> tuple[float | None, str]:
    """(peak memory in GiB, what was measured) for a run on `device`.

    On CUDA the peak memory allocated by torch on that device ("CUDA allocated"), which is
    what limits batch size; elsewhere the process's peak resident set (`peak_rss_bytes`).
    The value is None, with label "unavailable", when no source exists on this platform.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB, "CUDA allocated"
    value, label = peak_rss_bytes()
    return (None if value is None else value / GIB), label

"""Checkpoints: adapter files and resumable training state, written atomically and pruned.

Layout under the output folder:
    <name>.safetensors                  the final adapter
    <name>-step000100.safetensors       adapters saved during training
    checkpoints/step-000100/            Accelerate state: adapter tensors, optimizer,
                                        scheduler, RNG states, progress (step, data position)
A state folder is written under a temporary name and renamed when complete, so a crash at
any moment leaves the previous checkpoint usable and `resume = "latest"` never picks a half one.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from ..embeddings import embedding_path
from ..errors import ConfigError, OutputError
from ..fileformat import check_free_space

_STATE_RE = re.compile(r"step-(\d+)")


def state_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step-{step:06d}"


def adapter_path(output_dir: Path, name: str, step: int | None = None) -> Path:
    return output_dir / (f"{name}-step{step:06d}.safetensors" if step is not None else f"{name}.safetensors")


def save_state(accelerator, output_dir: Path, step: int, needed_bytes: int = 0) -> Path:
    """accelerator.save_state into a temp folder, then an atomic rename (main process renames)."""
    final = state_dir(output_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)  # before the other ranks write their RNG states into it
        check_free_space(tmp, needed_bytes)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
    except OSError as exc:
        raise OutputError(f"cannot write the checkpoint {tmp}: {exc.strerror or exc}; the previous checkpoints "
                          "are untouched") from exc
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    accelerator.wait_for_everyone()
    return final


def remove_stale_temporaries(output_dir: Path) -> int:
    """Delete what a killed run left half-written (`*.tmp` state folders and temp files)."""
    removed = 0
    for path in list((output_dir / "checkpoints").glob("*.tmp")) + list(output_dir.rglob(".*.tmp")):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed += 1
    return removed


def complete_states(output_dir: Path) -> list[tuple[int, Path]]:
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if p.is_dir() and (m := _STATE_RE.fullmatch(p.name))]
    return sorted(found)


def resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    """The state folder to resume from: None (fresh run), the newest complete one, or a path."""
    if resume is None:
        return None
    if resume == "latest":
        states = complete_states(output_dir)
        return states[-1][1] if states else None
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"train.resume: {path} is not a checkpoint folder (expected e.g. "
                          f"{state_dir(output_dir, 100)})")
    return path


def prune(output_dir: Path, name: str, keep_last: int | None) -> None:
    """Keep the newest `keep_last` state folders and step adapters; the final adapter stays."""
    if keep_last is None:
        return
    for _, path in complete_states(output_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
    pattern = re.compile(re.escape(name) + r"-step(\d+)\.safetensors")
    steps = sorted((int(m[1]), p) for p in output_dir.glob(f"{name}-step*.safetensors") if (m := pattern.fullmatch(p.name)))
    for _, path in steps[:-keep_last]:
        path.unlink(missing_ok=True)
        embedding_path(path).unlink(missing_ok=True)  # its trigger embedding, if one was trained

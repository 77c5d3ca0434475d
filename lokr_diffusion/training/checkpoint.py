"""Checkpoints: adapter files and resumable training state, written atomically, verified, pruned.

Layout under the output folder:
    <name>.safetensors                  the final adapter
    <name>-step000100.safetensors       adapters saved during training
    checkpoints/step-000100/            training state:
        model.safetensors, optimizer.bin, scheduler.bin (scaler.pt)   Accelerate's save_state
        lokr_rng_<rank>.safetensors     Python, NumPy, torch (and CUDA) RNG states per process
        lokr_progress.json              step, epoch, data-loader position, accelerator step
        lokr_ema.safetensors            EMA shadow parameters (+ lokr_ema.json), if train.ema_decay
        lokr_manifest.json              written last: what the state belongs to, every file's size
                                        and SHA-256

A state folder is written as `step-000100.lokr-<pid>.tmp` and renamed when complete, so a
crash at any moment leaves the previous checkpoint usable and `resume = "latest"` never picks
a half one.

A checkpoint folder is not trusted. Resuming never unpickles code: Accelerate pickles
registered objects into custom_checkpoint_N.pkl and reads them back with
torch.load(weights_only=False), so nothing is registered with it; progress and the data
position are JSON, the EMA and RNG states safetensors, and the state is loaded here rather
than by Accelerator.load_state: the model from safetensors, optimizer.bin / scheduler.bin /
scaler.pt with torch.load(weights_only=True) (tensors and plain containers only). Accelerate's
own random_states_N.pkl (a NumPy pickle, read by load_state with extra allowed globals, and
silently skipped when unreadable, which breaks an exact resume without a word) is deleted
after each save and never read. Before anything is loaded, the manifest must list exactly the
files present with matching sizes and hashes (a truncated, emptied, missing or extra file
makes the checkpoint damaged: "latest" falls back to the newest intact one), and the
manifest's identity (adapter settings, module keys, base model fingerprint, optimizer, batch
layout, process count) must equal this run's, or the resume is refused naming the difference.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..families import Family
from ..embeddings import embedding_path
from ..errors import CheckpointError, ConfigError, OutputError
from ..fileformat import check_free_space, is_stale_temp, temp_owner, temp_suffix
from . import stop as _stop

_STATE_RE = re.compile(r"step-(\d+)")
_LEGACY_TMP_RE = re.compile(r"step-\d+\.tmp")  # what versions before the manifest named their temp folders
MANIFEST = "lokr_manifest.json"
PROGRESS = "lokr_progress.json"
EMA_TENSORS, EMA_SETTINGS = "lokr_ema.safetensors", "lokr_ema.json"
FORMAT = "lokr-diffusion-checkpoint"
FORMAT_VERSION = 1
_TORCH_WRITE_FAILURE = re.compile(r"inline_container|PytorchStreamWriter|file write failed|write failed")


def _rng_name(rank: int) -> str:
    return f"lokr_rng_{rank}.safetensors"


def state_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step-{step:06d}"


def adapter_path(output_dir: Path, name: str, step: int | None = None) -> Path:
    return output_dir / (f"{name}-step{step:06d}.safetensors" if step is not None else f"{name}.safetensors")


# -- identity: what a checkpoint belongs to ----------------------------------------------------------

def model_fingerprint(module: torch.nn.Module) -> str:
    """Class, config, every tensor's name/shape/dtype and its first values: tells two base models
    apart (another model, another fine-tune) without hashing gigabytes at every start."""
    h = hashlib.sha256(type(module).__name__.encode())
    config = getattr(module, "config", None)
    if config is not None:
        as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        h.update(json.dumps(as_dict, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in sorted(module.state_dict().items()):
            h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            head = tensor.detach().reshape(-1)[:64].float().cpu().contiguous()
            h.update(head.numpy().tobytes())
    return h.hexdigest()[:24]


def run_identity(cfg, network, models: list[torch.nn.Module], family: Family, num_processes: int) -> dict[str, Any]:
    """What must be equal for a checkpoint to continue this run exactly.

    Keys read like config keys so a refusal can name them. Dropouts, learning rates, max_steps
    and sampling may change between runs; the shapes and meaning of the saved tensors may not.
    """
    net = dict(cfg.to_dict().get("network", {}))
    # init_from only sets the start: a checkpoint already holds what came of it
    for free in ("rank_dropout", "module_dropout", "rank_dropout_scale", "init_from"):
        net.pop(free, None)
    for later in ("use_scalar", "rs_lora", "unbalanced_factorization", "overrides"):  # keys newer than some
        if not net.get(later):  # checkpoints: left out while off, so those still resume
            net.pop(later, None)
    ident: dict[str, Any] = {f"network.{k}": _plain(v) for k, v in sorted(net.items())}
    keys = network.module_keys()
    shapes = sorted((n, tuple(p.shape)) for n, p in network.named_parameters())
    ident["network modules"] = f"{len(keys)} modules, " + hashlib.sha256(
        json.dumps([sorted(keys), shapes]).encode()).hexdigest()[:16]
    ident["base model"] = f"{cfg.model.pretrained_model} ({family.name}, " + hashlib.sha256(
        "|".join(model_fingerprint(m) for m in models).encode()).hexdigest()[:16] + ")"
    train = cfg.train
    for key in ("optimizer", "batch_size", "gradient_accumulation_steps", "mixed_precision"):
        ident[f"train.{key}"] = _plain(getattr(train, key))
    ident["train.ema"] = bool(getattr(train, "ema_decay", None))
    ident["processes"] = int(num_processes)
    return ident


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _identity_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<not set>"), current.get(key, "<not set>")
        if a != b:
            out.append(f"{key} is {a!r} in the checkpoint, {b!r} in this run")
    return out


# -- verification ------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class DamagedCheckpoint(CheckpointError):
    """The folder is not an intact checkpoint (an older intact one may still be used)."""


def read_manifest(path: Path) -> dict:
    """The manifest of a state folder, checked against the files present. Raises DamagedCheckpoint."""
    mpath = path / MANIFEST
    if not mpath.is_file():
        names = {p.name for p in path.iterdir()} if path.is_dir() else set()
        if "custom_checkpoint_0.pkl" in names and "lokr_manifest.json" not in names:
            raise DamagedCheckpoint(f"{path}: written by an older version of lokr-diffusion (pickled progress, no "
                                    f"{MANIFEST}); it cannot be resumed safely")
        raise DamagedCheckpoint(f"{path}: no {MANIFEST} (not a complete checkpoint of this trainer)")
    try:
        manifest = json.loads(mpath.read_bytes())
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError("not a lokr-diffusion checkpoint manifest")
        if manifest.get("version") != FORMAT_VERSION:
            raise ValueError(f"format version {manifest.get('version')!r}, this version reads {FORMAT_VERSION}")
        int(manifest["step"]), dict(manifest["identity"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DamagedCheckpoint(f"{mpath}: unreadable manifest ({exc})") from exc
    return manifest


def verify_files(path: Path, manifest: dict) -> None:
    """Every listed file present with its size and hash, and nothing else. Raises DamagedCheckpoint."""
    present = {p.name for p in path.iterdir()} - {MANIFEST}
    listed = set(manifest["files"])
    extra, missing = sorted(present - listed), sorted(listed - present)
    if missing:
        raise DamagedCheckpoint(f"{path}: missing {', '.join(missing)}")
    if extra:
        raise DamagedCheckpoint(f"{path}: unexpected file(s) {', '.join(extra)}, not written by this trainer "
                                "(refusing to load a folder someone else changed)")
    for name, info in sorted(manifest["files"].items()):
        f = path / name
        if not f.is_file():
            raise DamagedCheckpoint(f"{f}: not a file")
        size = f.stat().st_size
        if size != int(info["size"]):
            raise DamagedCheckpoint(f"{f}: {size} bytes, {info['size']} written (truncated or replaced)")
        if _sha256(f) != info["sha256"]:
            raise DamagedCheckpoint(f"{f}: contents differ from what was written")


def check_checkpoint(path: Path, identity: Mapping[str, Any] | None) -> dict:
    """Manifest, identity and files of one state folder; returns the manifest.

    Raises CheckpointError for another config (naming every difference) and DamagedCheckpoint
    for anything unreadable."""
    manifest = read_manifest(path)
    if identity is not None:
        diffs = _identity_differences(manifest["identity"], identity)
        if diffs:
            raise CheckpointError(f"{path} was saved by a run with another config: " + "; ".join(diffs) +
                                  ". Use the same settings, another output.dir, or train.resume = false")
    verify_files(path, manifest)
    return manifest


# -- temporaries -----------------------------------------------------------------------------------

def remove_stale_temporaries(output_dir: Path) -> int:
    """Delete what a killed run of this project left half-written: state folders named
    `step-NNNNNN.lokr-<pid>.tmp` (or the older `step-NNNNNN.tmp`) in checkpoints/, and
    `.<file>.<random>.lokr-<pid>.tmp` files anywhere under the output folder, whose writer is
    no longer running. Nothing else: a user's `.notes.tmp` stays."""
    removed = 0
    root = output_dir / "checkpoints"
    if root.is_dir():
        for path in root.iterdir():
            stem = path.name.split(".", 1)[0]
            pid = temp_owner(path.name, stem) if _STATE_RE.fullmatch(stem) else None
            if path.is_dir() and ((pid is not None and is_stale_temp(pid)) or _LEGACY_TMP_RE.fullmatch(path.name)):
                shutil.rmtree(path, ignore_errors=True)
                removed += 1
    for path in output_dir.rglob(".*.tmp"):
        pid = temp_owner(path.name)
        if pid is not None and path.is_file() and not path.is_symlink() and is_stale_temp(pid):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def complete_states(output_dir: Path) -> list[tuple[int, Path]]:
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if p.is_dir() and (m := _STATE_RE.fullmatch(p.name))]
    return sorted(found)


def resolve_resume(resume: str | None, output_dir: Path, identity: Mapping[str, Any] | None = None,
                   report: Callable[[str], None] = print) -> Path | None:
    """The state folder to resume from: None (fresh run), the newest intact one, or a path.

    "latest" skips damaged folders (saying why) and falls back to the newest intact one; a
    checkpoint of another config is refused, not skipped: an older one would differ the same way.
    """
    if resume is None:
        return None
    if resume == "latest":
        states = complete_states(output_dir)
        problems = []
        for _, path in reversed(states):
            try:
                check_checkpoint(path, identity)
            except DamagedCheckpoint as exc:
                problems.append(str(exc))
                report(f"checkpoint {path.name} is damaged: {exc}; trying the one before")
                continue
            if problems:
                report(f"resuming from {path.name}, the newest intact checkpoint")
            return path
        if problems:
            raise CheckpointError(f"no intact checkpoint in {output_dir / 'checkpoints'}: " + "; ".join(problems) +
                                  ". Move the folder away to start fresh, or set train.resume = false")
        return None
    path = Path(resume)
    if "\0" in resume:
        raise ConfigError("train.resume: the path contains a NUL character")
    if not path.is_dir():
        raise ConfigError(f"train.resume: {path} is not a checkpoint folder (expected e.g. "
                          f"{state_dir(output_dir, 100)})")
    try:
        check_checkpoint(path, identity)
    except DamagedCheckpoint as exc:
        raise CheckpointError(f"train.resume: {exc}") from exc
    return path


# -- saving and loading ------------------------------------------------------------------------------

def _rng_tensors(accelerator) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every RNG state Accelerate's random_states_N.pkl holds, as tensors + strings."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"python": torch.tensor(internal, dtype=torch.int64),
               "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64).copy()),
               "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    meta = {"python_version": str(version), "python_gauss": repr(gauss), "numpy_kind": str(kind),
            "numpy_pos": str(int(pos)), "numpy_has_gauss": str(int(has_gauss)), "numpy_cached": repr(float(cached))}
    return tensors, meta


def _set_rng(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    gauss = None if meta["python_gauss"] == "None" else float(meta["python_gauss"])
    random.setstate((int(meta["python_version"]), tuple(int(x) for x in tensors["python"].tolist()), gauss))
    np.random.set_state((meta["numpy_kind"], tensors["numpy"].numpy().astype(np.uint32), int(meta["numpy_pos"]),
                         int(meta["numpy_has_gauss"]), float(meta["numpy_cached"])))
    torch.set_rng_state(tensors["torch"].to(torch.uint8))
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict) -> None:
    with open(path, "wb") as f:
        f.write(json.dumps(data, indent=1, sort_keys=True).encode())
        f.flush()
        os.fsync(f.fileno())


def _torch_load(path: Path, map_location) -> Any:
    """Tensors and plain containers only: a pickle that names any other callable is refused."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # UnpicklingError, EOFError, RuntimeError: all mean "not a state we wrote"
        raise CheckpointError(f"{path}: cannot be loaded as plain tensors ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); refusing it") from exc


class TrainingState:
    """Saves and restores everything a run needs to continue exactly, without pickled objects.

    `progress` needs state_dict()/load_state_dict() of plain data (steps, the data-loader
    position); `ema` is diffusers' EMAModel or None; `identity` comes from run_identity().
    """

    def __init__(self, accelerator, output_dir: Path, progress, ema=None, identity: dict | None = None) -> None:
        from accelerate.utils import broadcast_object_list

        self.accelerator, self.output_dir = accelerator, Path(output_dir)
        self.progress, self.ema, self.identity = progress, ema, identity or {}
        # every process writes into the same temp folder: the main process's pid names it
        self.owner = broadcast_object_list([os.getpid()])[0] if accelerator.num_processes > 1 else os.getpid()

    # -- save
    def save(self, step: int, needed_bytes: int = 0) -> Path:
        """Write checkpoints/step-NNNNNN atomically; on any failure the temp folder is removed and
        the previous checkpoints are untouched."""
        acc = self.accelerator
        main = acc.is_main_process
        final = state_dir(self.output_dir, step)
        tmp = final.with_name(final.name + temp_suffix(self.owner))
        with _stop.critical(f"checkpoint {final.name}"):
            try:
                if main:
                    if tmp.exists():
                        shutil.rmtree(tmp)
                    tmp.mkdir(parents=True)  # before the other ranks write their RNG states into it
                    check_free_space(tmp, needed_bytes)
                acc.wait_for_everyone()
                acc.save_state(str(tmp))
                self._save_own_files(tmp)
                acc.wait_for_everyone()
                if main:
                    self._write_manifest(tmp, step)
                    if final.exists():
                        shutil.rmtree(final)
                    tmp.rename(final)
                    _fsync_dir(final.parent)
            except BaseException as exc:
                if main:
                    shutil.rmtree(tmp, ignore_errors=True)
                if isinstance(exc, OSError) and not isinstance(exc, OutputError):
                    raise OutputError(f"cannot write the checkpoint {final}: {exc.strerror or exc}; nothing of it "
                                      "was kept and the previous checkpoints are untouched") from exc
                if isinstance(exc, RuntimeError) and _TORCH_WRITE_FAILURE.search(str(exc)):
                    # torch.save reports a failed write (disk full, file size limit) as a RuntimeError
                    raise OutputError(f"cannot write the checkpoint {final}: torch.save failed ("
                                      f"{str(exc).splitlines()[0]}): the disk is probably full or a file size limit "
                                      "was reached; nothing of it was kept and the previous checkpoints are "
                                      "untouched") from exc
                raise
            acc.wait_for_everyone()
        return final

    def _save_own_files(self, folder: Path) -> None:
        from safetensors.torch import save_file

        acc = self.accelerator
        rank = acc.process_index
        (folder / f"random_states_{rank}.pkl").unlink(missing_ok=True)  # a pickle: never read back
        tensors, meta = _rng_tensors(acc)
        save_file(tensors, str(folder / _rng_name(rank)), metadata=meta)
        if acc.is_main_process:
            _write_json(folder / PROGRESS, {"progress": self.progress.state_dict(), "accelerator_step": int(acc.step)})
            if self.ema is not None:
                ema_state = self.ema.state_dict()
                shadow = {f"shadow.{i:05d}": t.detach().contiguous().cpu() for i, t in enumerate(ema_state["shadow_params"])}
                save_file(shadow, str(folder / EMA_TENSORS))
                _write_json(folder / EMA_SETTINGS, {k: v for k, v in ema_state.items()
                                                   if k != "shadow_params" and isinstance(v, (bool, int, float, type(None)))})

    def _write_manifest(self, folder: Path, step: int) -> None:
        files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(folder.iterdir()) if p.is_file()}
        _write_json(folder / MANIFEST, {"format": FORMAT, "version": FORMAT_VERSION, "step": step,
                                        "identity": self.identity, "files": files})
        _fsync_dir(folder)

    # -- resume
    def resume(self, resume: str | None, loader=None, report: Callable[[str], None] = print) -> Path | None:
        """Clean this project's stale temporaries, pick the checkpoint (main process), load it everywhere.

        Returns the folder resumed from, or None for a fresh start."""
        from accelerate.utils import broadcast_object_list

        acc = self.accelerator
        main = acc.is_main_process
        chosen: list = [None, None]
        if main:
            if self.output_dir.exists() and remove_stale_temporaries(self.output_dir):
                report(f"removed half-written files of an interrupted run in {self.output_dir}")
            try:
                path = resolve_resume(resume, self.output_dir, self.identity, report)
                chosen = [str(path) if path is not None else None, None]
            except (CheckpointError, ConfigError) as exc:
                chosen = [None, exc]
        error = chosen[1]
        if acc.num_processes > 1:
            chosen = broadcast_object_list([chosen[0], str(error) if error else None])
        if error is not None:
            raise error
        if chosen[1] is not None:  # the main process refused: the others stop with the same message
            raise CheckpointError(chosen[1])
        if chosen[0] is None:
            if resume == "latest" and main:
                report("resume = 'latest': no checkpoint yet, starting fresh")
            return None
        path = Path(chosen[0])
        self.load(path)
        if loader is not None and getattr(self.progress, "data", None):
            loader.load_state_dict(self.progress.data)
        if main:
            report(f"resumed from {path} at step {self.progress.step}")
        return path

    def load(self, folder: Path) -> None:
        """Restore model, optimizer, scheduler, scaler, RNG, progress and EMA from a checked folder."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file, load_model

        acc = self.accelerator
        multi = acc.num_processes > 1 and getattr(acc, "multi_device", False)
        map_location = acc.device if multi else "cpu"
        try:
            for i, model in enumerate(acc._models):
                load_model(model, str(folder / f"model{f'_{i}' if i else ''}.safetensors"), device=str(map_location))
            for i, opt in enumerate(acc._optimizers):
                opt.load_state_dict(_torch_load(folder / f"optimizer{f'_{i}' if i else ''}.bin", map_location))
            for i, sched in enumerate(acc._schedulers):
                sched.load_state_dict(_torch_load(folder / f"scheduler{f'_{i}' if i else ''}.bin", None))
            if acc.scaler is not None:
                acc.scaler.load_state_dict(_torch_load(folder / "scaler.pt", None))
            rng_file = folder / _rng_name(acc.process_index)
            if not rng_file.is_file():
                raise CheckpointError(f"{folder}: no RNG state for process {acc.process_index} (saved by fewer processes)")
            from safetensors import safe_open

            with safe_open(str(rng_file), framework="pt") as f:
                meta = f.metadata() or {}
            _set_rng(load_file(str(rng_file)), meta)
            saved = json.loads((folder / PROGRESS).read_text())
            self.progress.load_state_dict(saved["progress"])
            acc.step = int(saved["accelerator_step"])
            if self.ema is not None:
                shadow = load_file(str(folder / EMA_TENSORS), device=str(acc.device))
                settings = json.loads((folder / EMA_SETTINGS).read_text())
                params = [shadow[k] for k in sorted(shadow)]
                if len(params) != len(self.ema.shadow_params):
                    raise CheckpointError(f"{folder / EMA_TENSORS}: {len(params)} EMA tensors, this run has "
                                          f"{len(self.ema.shadow_params)}")
                self.ema.load_state_dict({**settings, "shadow_params": params})
        except CheckpointError:
            raise
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
            raise CheckpointError(f"{folder}: cannot be resumed from ({type(exc).__name__}: {exc})") from exc


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

"""One run per output folder: a lock file naming its holder.

Two runs writing the same folder would interleave checkpoints, prune each other's files and
delete each other's temporaries, so the main process creates `<output>/.lokr-diffusion.lock`
(O_EXCL) before anything else is written there and removes it when the run ends. The file
holds the pid, host, process start time and start date of the holder, so a refusal can say who
holds it.

A lock whose holder is gone (same host, pid not running, or the pid now belongs to a process
started at another time) is stale: it is taken over with a message. A lock held from another
host, or by a live process, is only broken on request: `train.py --break-lock` or the
environment variable LOKR_DIFFUSION_BREAK_LOCK=1 (for launchers that add no flags). This is not
a config key on purpose: breaking a lock is a decision about one invocation, not part of a recipe.
"""
from __future__ import annotations

import atexit
import datetime as _dt
import errno
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import OutputError, OutputLockedError

LOCK_NAME = ".lokr-diffusion.lock"
BREAK_LOCK_ENV = "LOKR_DIFFUSION_BREAK_LOCK"

_HELD: list["OutputLock"] = []


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot) or None where /proc is absent:
    tells a live holder from an unrelated process that reused its pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or held) a lock file."""

    pid: int
    host: str
    started: str
    proc_start: str | None = None
    command: str = ""

    @classmethod
    def me(cls) -> "LockHolder":
        import sys

        return cls(pid=os.getpid(), host=socket.gethostname(),
                   started=_dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                   proc_start=_process_start(os.getpid()), command=" ".join(sys.argv)[:300])

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, started {self.started}" + (
            f" ({self.command})" if self.command else "")

    def is_stale(self) -> bool:
        """True when the holder certainly no longer runs: only decidable on the holder's host."""
        if self.host != socket.gethostname():
            return False
        if not _pid_alive(self.pid):
            return True
        current = _process_start(self.pid)
        return self.proc_start is not None and current is not None and current != self.proc_start


class OutputLock:
    """A held lock; `release()` removes the file if it is still this holder's."""

    def __init__(self, path: Path, holder: LockHolder) -> None:
        self.path, self.holder = path, holder

    def release(self) -> None:
        try:
            if _read_holder(self.path) == self.holder:
                self.path.unlink()
        except (OSError, ValueError):
            pass
        if self in _HELD:
            _HELD.remove(self)


def _read_holder(path: Path) -> LockHolder:
    """Raises ValueError for a lock file that is not one of ours (empty, half written, garbage)."""
    try:
        raw = json.loads(path.read_text())
        return LockHolder(pid=int(raw["pid"]), host=str(raw["host"]), started=str(raw["started"]),
                          proc_start=raw.get("proc_start"), command=str(raw.get("command", "")))
    except (KeyError, TypeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(str(exc)) from exc


def break_lock_requested(flag: bool = False) -> bool:
    """The --break-lock flag or LOKR_DIFFUSION_BREAK_LOCK set to 1/true/yes."""
    return flag or os.environ.get(BREAK_LOCK_ENV, "").strip().lower() in ("1", "true", "yes")


def acquire(output_dir: str | os.PathLike, *, break_lock: bool = False,
            report: Callable[[str], None] = print) -> OutputLock:
    """Create the output folder if needed and lock it for this process.

    Raises OutputLockedError naming the holder when a live run (or one on another host) holds
    it, and OutputError when the folder cannot be created or written: this is also the check
    that the output folder is usable at all, before any training starts.
    """
    output_dir = Path(output_dir)
    path = output_dir / LOCK_NAME
    me = LockHolder.me()
    payload = json.dumps(me.__dict__, indent=1).encode()
    for _ in range(5):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                holder = _read_holder(path)
            except ValueError:
                holder = None
            except OSError as exc:
                raise OutputError(f"cannot read the lock file {path}: {exc.strerror or exc}") from exc
            if holder is None:
                report(f"{path}: unreadable lock file (not written by a run of this version); replacing it")
            elif holder.is_stale():
                report(f"taking over the stale lock of {output_dir}: its holder ({holder.describe()}) is no "
                       "longer running")
            elif break_lock:
                report(f"breaking the lock of {output_dir} held by {holder.describe()} (--break-lock / "
                       f"{BREAK_LOCK_ENV}=1): two runs writing one folder will damage each other's checkpoints")
            else:
                where = "on another host: it cannot be checked from here" if holder.host != me.host else "still running"
                raise OutputLockedError(
                    f"{output_dir} is in use by another training run ({holder.describe()}; {where}). Wait for it, "
                    f"choose another output.dir, or, if that run is gone, pass --break-lock (or set {BREAK_LOCK_ENV}=1)")
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            continue
        except FileNotFoundError:
            _make_dir(output_dir)
            continue
        except OSError as exc:
            raise _output_error(output_dir, exc) from exc
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            path.unlink(missing_ok=True)
            raise _output_error(output_dir, exc) from exc
        lock = OutputLock(path, me)
        _HELD.append(lock)
        return lock
    raise OutputLockedError(f"{path}: could not take the lock (another run keeps replacing it)")


def _make_dir(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:  # a file where the folder should be
        raise OutputError(f"output.dir {output_dir}: exists and is not a folder") from exc
    except OSError as exc:
        raise _output_error(output_dir, exc) from exc


def _output_error(output_dir: Path, exc: OSError) -> OutputError:
    reason = {errno.ENOTDIR: "a part of the path is a file, not a folder",
              errno.EROFS: "the file system is read-only",
              errno.EACCES: "permission denied", errno.EPERM: "permission denied",
              errno.ENOSPC: "the disk is full"}.get(exc.errno, exc.strerror or str(exc))
    return OutputError(f"output.dir {output_dir}: cannot write there ({reason})")


def held() -> list[OutputLock]:
    """The locks this process holds now."""
    return list(_HELD)


def release_all(keep: list[OutputLock] | tuple = ()) -> None:
    """Release every lock this process holds except `keep` (the top-level error handler passes
    the ones held before its run; atexit passes none)."""
    for lock in list(_HELD):
        if lock not in keep:
            lock.release()


atexit.register(release_all)


def check_output_path(output_dir: str | os.PathLike) -> Path:
    """Refuse an output path that cannot be a folder, with a message that says why (before any
    model loads): a NUL character, an existing file, a file among its parents."""
    text = os.fspath(output_dir)
    if "\0" in text:
        raise OutputError(f"output.dir {text!r}: contains a NUL character, which no file system accepts")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise OutputError(f"output.dir {path}: exists and is a file, not a folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"output.dir {path}: {parent} is a file, not a folder")
            break
    return path


def lock_output_dir(accelerator, output_dir: str | os.PathLike, *, break_lock: bool = False,
                    report: Callable[[str], None] = print) -> OutputLock | None:
    """Check and lock the output folder on the main process only; every process raises the same
    error when it cannot be (so no rank waits forever for a main process that gave up)."""
    error: OutputError | None = None
    held = None
    if accelerator.is_main_process:
        try:
            check_output_path(output_dir)
            held = acquire(output_dir, break_lock=break_lock_requested(break_lock), report=report)
        except OutputError as exc:
            error = exc
    message = str(error) if error else None
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = broadcast_object_list([message])[0]
    if error is not None:
        raise error
    if message:
        raise OutputError(f"the main process could not use the output folder: {message}")
    return held

"""The one top-level error handler of `lokr-diffusion`, `train.py` and `training.loop.main`.

Why one place: a user should see a single line for a problem they can fix (a bad config, a full
disk, a read-only folder, an output closed by `| head`) and a traceback only for what is our
bug, and all entry points should agree on the exit codes:

    0    success
    2    a problem with the input the message names (LokrDiffusionError, non-finite training,
         a NUL in a path)
    1    the operating system refused (disk full, permission denied, missing file, read-only...)
    3    training stopped by a signal after saving a checkpoint (the message has the resume command)
    130  interrupted (Ctrl-C outside training, or a second Ctrl-C during it)
    141  stdout was closed early (`lokr-diffusion inspect f | head`): silent, like other Unix tools
    70   an unexpected exception: the traceback, then one line saying it is a bug and where to report it
"""
from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import Callable

from .errors import LokrDiffusionError

BUG_REPORT = ("this is a bug in lokr-diffusion, not a problem with your input: please report it on the project's "
              "issue tracker with the command, the config file and the traceback above")

EXIT_INPUT, EXIT_OS, EXIT_STOPPED, EXIT_BUG, EXIT_INTERRUPTED, EXIT_PIPE = 2, 1, 3, 70, 130, 141

_OS_REASONS = {
    errno.ENOSPC: "no space left on the device (free some space and run again)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOENT: "no such file or folder",
    errno.EISDIR: "is a folder, a file was expected",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.ENAMETOOLONG: "file name too long",
    errno.EFBIG: "file too large (a file size limit was reached)",
}


def describe_os_error(exc: OSError) -> str:
    """`<what went wrong>: <file>` for an OSError, in words rather than an errno name."""
    reason = _OS_REASONS.get(exc.errno, exc.strerror or str(exc))
    where = [str(f) for f in (exc.filename, exc.filename2) if f is not None]
    return reason + (f": {' -> '.join(where)}" if where else "")


def _stdout_closed() -> None:
    """After a broken pipe, point stdout at /dev/null so the interpreter's final flush is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _say(prog: str, text: str) -> None:
    try:
        print(f"{prog}: {text}", file=sys.stderr, flush=True)
    except (OSError, ValueError):  # stderr itself is gone: nothing left to tell
        pass


def run_guarded(prog: str, func: Callable[[], int | None]) -> int:
    """Run `func` and turn what it raises into one message and an exit code (table above).

    Also releases output-folder locks and signal handlers the run installed, so an in-process
    caller (a notebook, the tests) is left as it was.
    """
    from .training import lock
    from .training.stop import TrainingAborted, TrainingStopped

    locks_before = lock.held()
    try:
        return int(func() or 0)
    except TrainingStopped as exc:
        _say(prog, str(exc))
        return EXIT_STOPPED
    except TrainingAborted as exc:
        _say(prog, f"interrupted: {exc}")
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        _say(prog, "interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _stdout_closed()
        return EXIT_PIPE
    except LokrDiffusionError as exc:
        _say(prog, f"error: {exc}")
        return EXIT_INPUT
    except FloatingPointError as exc:  # the trainer's "non-finite loss N times in a row"
        _say(prog, f"error: {exc}")
        return EXIT_INPUT
    except OSError as exc:
        if exc.errno is None:  # an OSError a library made up: no environment problem we can name
            return _bug(prog, exc)
        _say(prog, f"error: {describe_os_error(exc)}")
        return EXIT_OS
    except ValueError as exc:
        if "embedded null byte" in str(exc) or "NUL character" in str(exc):
            _say(prog, "error: a path contains a NUL character, which no file system accepts")
            return EXIT_INPUT
        return _bug(prog, exc)
    except MemoryError:
        _say(prog, "error: out of memory (lower the batch size or the resolution)")
        return EXIT_OS
    except Exception as exc:  # noqa: BLE001 - the point of a top-level handler
        if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
            _say(prog, f"error: out of GPU memory (lower the batch size or the resolution, or enable "
                       f"train.gradient_checkpointing): {str(exc).splitlines()[0]}")
            return EXIT_OS
        return _bug(prog, exc)
    finally:
        _cleanup(locks_before)


def _bug(prog: str, exc: BaseException) -> int:
    try:
        traceback.print_exception(exc, file=sys.stderr)
    except (OSError, ValueError):
        pass
    _say(prog, f"internal error ({type(exc).__name__}): {BUG_REPORT}")
    return EXIT_BUG


def _cleanup(locks_before: list) -> None:
    from .training import lock, stop

    lock.release_all(keep=locks_before)
    stop.uninstall()

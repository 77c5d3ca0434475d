"""Ctrl-C and SIGTERM during training: finish the step, save, stop; never a half checkpoint.

First signal: a flag; the loop finishes its step, saves a checkpoint and raises TrainingStopped
(exit code 3, with the resume command).

A second signal aborts (KeyboardInterrupt -> exit code 130), except:
- within DUPLICATE_WINDOW_S of the first one. `accelerate launch` on several processes
  (torch.distributed.run) forwards the terminal's Ctrl-C to every worker that already got it
  from the terminal, so one key press arrives twice within milliseconds; reading that as "abort"
  lost the checkpoint the first press asked for.
- while a checkpoint is being written (`critical()`): the write finishes first (it is the
  checkpoint the first signal asked for), then the run aborts. A third signal during the write
  aborts at once; the half-written folder keeps its temporary name and is removed on the way
  out (checkpoint.save_state), so `resume = "latest"` never sees it.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Iterator

DUPLICATE_WINDOW_S = 2.0
WINDOW_ENV = "LOKR_DIFFUSION_SIGNAL_WINDOW"  # seconds; 0 turns the duplicate filter off (tests)


def _window() -> float:
    try:
        return float(os.environ.get(WINDOW_ENV, DUPLICATE_WINDOW_S))
    except ValueError:
        return DUPLICATE_WINDOW_S


class TrainingStopped(RuntimeError):
    """Raised after a checkpoint was saved because of a signal; carries the resume hint."""


class TrainingAborted(KeyboardInterrupt):
    """A second Ctrl-C: stop without the final checkpoint (the last complete one stays)."""


_ACTIVE: "StopRequested | None" = None


def _say(text: str) -> None:
    """Write from a signal handler: os.write is safe where print (buffered, tqdm) is not."""
    try:
        os.write(2, f"\n{text}\n".encode())
    except OSError:
        pass


class StopRequested:
    """SIGINT / SIGTERM set a flag; the loop finishes its step, saves, and exits non-zero."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.first_at = 0.0
        self.writing: str | None = None  # what critical() protects, while it runs
        self.abort_after_write = False
        self.presses_during_write = 0

    def install(self) -> None:
        global _ACTIVE
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)
        _ACTIVE = self

    def _handle(self, signum, frame) -> None:
        if self.signal is None:
            self.signal, self.first_at = signum, time.monotonic()
            _say(f"signal {signum}: finishing this step, then saving a checkpoint "
                 "(press Ctrl-C again to stop without it)")
            return
        if time.monotonic() - self.first_at < _window():
            return  # the same press, forwarded by the launcher
        if self.writing is not None:
            self.presses_during_write += 1
            if self.presses_during_write == 1:
                self.abort_after_write = True
                _say(f"waiting for {self.writing} to be written before stopping (press Ctrl-C once more to "
                     "abort now and discard it)")
                return
            raise TrainingAborted(f"aborted while writing {self.writing}: it was discarded")
        raise TrainingAborted("aborted by a second signal: no checkpoint for the steps since the last one")


@contextlib.contextmanager
def critical(what: str) -> Iterator[None]:
    """A checkpoint write: a second Ctrl-C waits for it instead of cutting it in half."""
    stop = _ACTIVE
    if stop is None:
        yield
        return
    outer, stop.writing = stop.writing, what
    try:
        yield
    finally:
        stop.writing = outer
    if outer is None and stop.abort_after_write:
        stop.abort_after_write = False
        raise TrainingAborted(f"aborted by a second signal after {what} was written")


def uninstall() -> None:
    """Back to the default handlers (in-process callers: tests, notebooks)."""
    global _ACTIVE
    if _ACTIVE is not None:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _ACTIVE = None

"""What a run logs, step by step: the loss (raw and smoothed), the learning rate, the gradient
norm and the validation loss, through Accelerate's trackers (TensorBoard, wandb) and always a
plain CSV file (`logs/<name>_loss.csv`) that needs nothing installed; at the end of the run, a
chart of the loss curves next to the adapter (`<name>_loss.png`).

The CSV is also the run's memory: a resumed run cuts it back to the checkpoint's step, carries
on appending, and recomputes the smoothed loss from it, so the chart spans the whole run.
"""
from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from accelerate.tracking import GeneralTracker

COLUMNS = ("step", "loss", "loss_smoothed", "lr", "grad_norm", "val_loss")


def csv_path(output_dir: Path, name: str) -> Path:
    return output_dir / "logs" / f"{name}_loss.csv"


def chart_path(output_dir: Path, name: str) -> Path:
    return output_dir / f"{name}_loss.png"


class CsvLog(GeneralTracker):
    """An Accelerate tracker writing one CSV row per logged step (the `COLUMNS`; an empty cell
    where a value was not logged). Rows are appended and flushed as they come: a crash loses at
    most the row being written, which `read_log` skips."""

    name = "csv"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)
        self._file: io.TextIOWrapper | None = None

    @property
    def tracker(self) -> Path:
        return self.path

    def restart(self, step: int) -> list[dict[str, float | None]]:
        """Keep the rows up to `step` (0: a fresh run keeps none), rewritten atomically; returns them."""
        from ..fileformat import atomic_write_bytes

        self.finish()
        rows = [r for r in read_log(self.path) if r["step"] <= step]
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(COLUMNS)
        writer.writerows([_cells(r) for r in rows])
        atomic_write_bytes(self.path, out.getvalue().encode())
        return rows

    def log(self, values: Mapping[str, Any], step: int | None = None, **kwargs: Any) -> None:
        if step is None or not any(values.get(k) is not None for k in COLUMNS[1:]):
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fresh = not self.path.exists() or self.path.stat().st_size == 0
            self._file = open(self.path, "a", encoding="utf-8", newline="")
            if fresh:
                self._file.write(",".join(COLUMNS) + "\n")
        row = {k: values.get(k) for k in COLUMNS[1:]}
        csv.writer(self._file, lineterminator="\n").writerow(_cells({"step": step, **row}))
        self._file.flush()

    def finish(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _cells(row: Mapping[str, Any]) -> list[str]:
    out = []
    for k in COLUMNS:
        v = row.get(k)
        out.append("" if v is None else str(int(v)) if k == "step" else repr(float(v)))
    return out


def read_log(path: Path) -> list[dict[str, float | None]]:
    """The rows of a CSV log (missing file: none). A last row without its newline (a run killed
    mid-write) and a row that does not parse are skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
    rows = []
    for raw in csv.DictReader(io.StringIO(text, newline="")):
        try:
            row: dict[str, float | None] = {"step": int(raw["step"])}
            for k in COLUMNS[1:]:
                cell = (raw.get(k) or "").strip()
                row[k] = float(cell) if cell else None
        except (TypeError, ValueError):
            continue
        rows.append(row)
    return rows


class Smoother:
    """Exponential moving average with bias correction (the first value is itself, not `beta`
    times zero): `beta` is the weight of the past."""

    def __init__(self, beta: float) -> None:
        self.beta, self.average, self.count = beta, 0.0, 0

    def update(self, value: float) -> float:
        if not math.isfinite(value):
            return self.value
        self.count += 1
        self.average = self.beta * self.average + (1 - self.beta) * value
        return self.value

    @property
    def value(self) -> float:
        return self.average / (1 - self.beta ** self.count) if self.count else math.nan


def trackers(cfg: Any, output_dir: Path) -> list[Any]:
    """`log_with` for the Accelerator: the configured trackers and the CSV log."""
    return [*cfg.logging.active_trackers, CsvLog(csv_path(output_dir, cfg.output.name))]


class Journal:
    """The per-step bookkeeping of a run: one `step` call per optimizer step (validation when it
    is due, one `accelerator.log` when anything is to be logged) and one `finish` at the end
    (a last validation, the chart). Every process calls both: validation is reduced across them."""

    def __init__(self, accelerator: Any, cfg: Any, output_dir: Path, validator: Any, start_step: int,
                 max_steps: int) -> None:
        self.accelerator, self.cfg, self.output_dir = accelerator, cfg, output_dir
        self.validator, self.max_steps = validator, max_steps
        self.smoother = Smoother(cfg.logging.smoothing)
        self.last_validated: int | None = None
        self.log = self._csv()
        if self.log is not None:
            for row in self.log.restart(start_step):  # a resumed run: the history so far
                if row["loss"] is not None:
                    self.smoother.update(row["loss"])

    def _csv(self) -> CsvLog | None:
        for tracker in getattr(self.accelerator, "trackers", []):
            if isinstance(tracker, CsvLog):
                return tracker
        return None

    def step(self, step: int, loss: float, lr: float, grad_norm: Any = None) -> None:
        every = self.cfg.validation.every_steps
        logs: dict[str, float] = {}
        if self.validator is not None and ((every and step % every == 0) or step >= self.max_steps):
            logs.update(self.validate(step))
        if step % self.cfg.logging.log_every_steps == 0 or logs:
            logs.update(loss=loss, loss_smoothed=self.smoother.update(loss), lr=lr)
            if grad_norm is not None:
                logs["grad_norm"] = float(grad_norm)
            self.accelerator.log(logs, step=step)

    def validate(self, step: int) -> dict[str, float]:
        self.last_validated = step
        return self.validator.evaluate()

    def finish(self, step: int, title: str) -> Path | None:
        """The last validation (if this step has none yet) and, on the main process, the chart of
        the whole run's CSV; returns the chart's path (None elsewhere or without data)."""
        from .plot import draw_loss_chart

        if self.validator is not None and self.last_validated != step:
            self.accelerator.log(self.validate(step), step=step)
        if self.log is None or not self.accelerator.is_main_process:
            return None
        rows = read_log(self.log.path)
        if not rows:
            return None
        return draw_loss_chart(rows, chart_path(self.output_dir, self.cfg.output.name), title=title)

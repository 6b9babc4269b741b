"""Training logs: ``metrics.csv`` in the run folder (plus TensorBoard events when it is installed) and the
progress bar with its images-or-tokens-per-second meter."""

from __future__ import annotations

import csv
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from utils.loop import BadStepTracker, finish_message
from utils.training import NonFiniteCheck

try:
    from torch.utils.tensorboard import SummaryWriter
except ImportError:  # tensorboard is optional
    SummaryWriter = None


class MetricsLogger:
    """Appends one row per call to ``metrics.csv``; columns are fixed when the logger is created.

    On resume, rows after ``resume_step`` (written by the interrupted run after its last checkpoint)
    are dropped so the file matches the continued run.
    """

    def __init__(self, run_dir: str | Path, columns: list[str], resume_step: int | None = None,
                 tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.csv"
        self.columns = ["step", *columns]
        rows = self._rows_up_to(resume_step) if resume_step is not None else []
        with open(self.path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(self.columns)
            writer.writerows(rows)
        self.writer = None
        if tensorboard and SummaryWriter is not None:
            purge = resume_step + 1 if resume_step is not None else None
            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge)

    def _rows_up_to(self, step: int) -> list[list[str]]:
        """Complete rows of the existing file up to ``step`` (a row cut short by a kill is dropped)."""
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header != self.columns:
                return []
            return [row for row in reader
                    if len(row) == len(self.columns) and row[0].isdigit() and int(row[0]) <= step]

    def log(self, step: int, values: dict[str, Any]) -> None:
        unknown = set(values) - set(self.columns)
        if unknown:
            raise KeyError(f"metrics {sorted(unknown)} were not declared as columns")
        row = [step] + [_format(values.get(name, "")) for name in self.columns[1:]]
        with open(self.path, "a", newline="") as handle:
            csv.writer(handle).writerow(row)
        if self.writer is not None:
            for name, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class TrainingLog:
    """The progress bar, ``metrics.csv`` and non-finite step count of a training run; only the main
    process shows and writes.

    :meth:`step` is called after every optimizer step with the step's logs, 0-d tensors on the device
    read (converted to floats, which waits for the GPU on CUDA) only on log steps, and the step's
    :class:`utils.training.NonFiniteCheck`, read at the next log step too: skipped steps are then
    announced and counted by ``bad_steps``, which stops training after too many in a row (at the log
    step after they happened). On log steps it adds the learning rate, the throughput (``items_per_s``
    since the previous log step) and ``bad_steps``, shows ``postfix_keys`` on the bar and writes the
    values whose names are ``columns``.
    """

    def __init__(self, run_dir: Path, columns: list[str], *, start_step: int, max_steps: int, log_every: int,
                 items_per_step: int, desc: str, postfix_keys: tuple[str, ...], is_main: bool,
                 bad_steps: BadStepTracker) -> None:
        self.columns, self.max_steps, self.log_every, self.is_main = columns, max_steps, log_every, is_main
        self.bad_steps = bad_steps
        self.items_per_step, self.postfix_keys = items_per_step, postfix_keys
        self.metrics = MetricsLogger(run_dir, columns, resume_step=start_step or None) if is_main else None
        self.bar = tqdm(total=max_steps, initial=start_step, desc=desc, disable=not is_main, dynamic_ncols=True,
                        file=sys.stdout)
        self.started = self.window_start = self.last_step_end = time.perf_counter()
        self.window_items, self.steps_run = 0, 0
        self.unchecked: list[tuple[int, NonFiniteCheck]] = []

    def __enter__(self) -> TrainingLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def step(self, step: int, logs: dict[str, Any], check: NonFiniteCheck, lr: float) -> None:
        """Account for optimizer step ``step`` (1-based), taken at learning rate ``lr``, whose non-finite
        check is ``check``, and log ``logs`` when it is a log step."""
        self.unchecked.append((step, check))
        log_step = step % self.log_every == 0 or step == self.max_steps
        self.window_items += self.items_per_step
        self.steps_run += 1
        self.last_step_end = time.perf_counter()
        self.bar.update(1)
        if not log_step:
            return
        cause = self._check_steps()
        logs = {} if cause is not None else {**as_floats(logs), "lr": lr}
        elapsed = time.perf_counter() - self.window_start
        logs = {**logs, "items_per_s": self.window_items / max(elapsed, 1e-9),
                "bad_steps": float(self.bad_steps.total)}
        self.window_start, self.window_items = time.perf_counter(), 0
        self.bar.set_postfix({k: f"{logs[k]:.4g}" for k in self.postfix_keys if k in logs})
        if self.metrics is not None:
            self.metrics.log(step, {k: v for k, v in logs.items() if k in self.columns})

    def _check_steps(self) -> str | None:
        """Tell ``bad_steps`` about the steps not yet accounted for (reading device checks); the cause of
        the latest one's skip, or None."""
        unchecked, self.unchecked = self.unchecked, []
        cause = None
        for step, check in unchecked:
            cause = check.cause()
            skipped = self.bad_steps.record(step, cause)
            if skipped:
                self.write(skipped)
        return cause

    def finish(self, device: Any, checkpoint: Path) -> None:
        """Print the closing line: steps run, time per step (the steps only, not the last checkpoint and
        samples), peak memory and where the checkpoint is."""
        if self.is_main and self.steps_run:
            print(finish_message(self.steps_run, self.last_step_end - self.started, device, checkpoint))

    def write(self, line: str) -> None:
        """Print ``line`` above the progress bar (main process only)."""
        if self.is_main:
            self.bar.write(line)

    def close(self) -> None:
        """Close the bar and the metrics files (again is harmless)."""
        self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None


def as_floats(logs: dict[str, Any]) -> dict[str, Any]:
    """A step's logs with tensor values read as Python floats (on CUDA this waits for the GPU)."""
    return {key: float(value) if isinstance(value, torch.Tensor) else value for key, value in logs.items()}


def _format(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


class MetricsFileError(ValueError):
    """A metrics.csv that is not a table of numbers under a header, as the training scripts write it."""


def read_metrics(path: str | Path) -> dict[str, list[float]]:
    """Columns of a metrics.csv as float lists (empty cells become NaN); :class:`MetricsFileError` names the
    line and column of the first cell that is not a number."""
    try:
        with open(path, newline="") as handle:
            reader = csv.reader(handle)
            header = next(reader, [])
            columns: dict[str, list[float]] = {name: [] for name in header}
            for row in reader:
                if len(row) > len(header):
                    raise MetricsFileError(f"'{path}', line {reader.line_num}: {len(row)} cells under a header of "
                                           f"{len(header)} columns.")
                for name, cell in zip(header, row + [""] * (len(header) - len(row))):
                    columns[name].append(_number(cell, path, reader.line_num, name))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise MetricsFileError(f"'{path}' cannot be read as a CSV table ({err}).") from err
    return columns


def _number(cell: str, path: str | Path, line: int, column: str) -> float:
    if cell == "":
        return math.nan
    try:
        return float(cell)
    except ValueError:
        raise MetricsFileError(f"'{path}', line {line}, column '{column}': {cell[:40]!r} is not a number. A "
                               f"metrics.csv as the training scripts write it holds only numbers; pass the run "
                               f"folder of a training, or fix that cell.") from None

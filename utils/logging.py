"""Training logs: ``metrics.csv`` in the run folder, plus TensorBoard events when it is installed."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

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


def _format(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else value


def read_metrics(path: str | Path) -> dict[str, list[float]]:
    """Columns of a metrics.csv as float lists (empty cells become NaN)."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        columns: dict[str, list[float]] = {name: [] for name in reader.fieldnames or []}
        for row in reader:
            for name, cell in row.items():
                columns[name].append(float(cell) if cell not in ("", None) else math.nan)
    return columns

"""Small helpers of the training scripts' step loop: stop signals, non-finite step tracking, cadence,
and the closing line."""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from tqdm import tqdm

from utils.device import peak_memory_mb
from utils.distributed import DistInfo, replicas_agree


class TrainingStopped(RuntimeError):
    """Training cannot go on (too many non-finite steps)."""


def is_due(step: int, every: int) -> bool:
    """Whether something done every ``every`` steps (0 = never) happens after ``step`` steps."""
    return every > 0 and step % every == 0


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop checks, so it can save before exiting."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None:  # a second signal exits at once; a third one, even from blocking C code
            for sig in self._previous:
                signal.signal(sig, signal.SIG_DFL)
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        tqdm.write(f"Received {self.signal_name}: saving a checkpoint after this step, then stopping. Send it again "
                   f"to stop at once.", file=sys.stderr)

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self, info: DistInfo, device: torch.device) -> bool:
        """True on every rank as soon as any rank got a signal."""
        flag = self.signal_name is not None
        if info.enabled:
            tensor = torch.tensor([float(flag)], device=device)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
            flag = bool(tensor.item())
        return flag

    def exit(self, info: DistInfo, checkpoint: Path, step: int) -> NoReturn:
        """Say where the run was saved and exit with 130 (SIGINT) or 143 (SIGTERM)."""
        name = self.signal_name or "a stop signal in another process"
        if info.is_main:
            tqdm.write(f"Received {name}: saved {checkpoint} at step {step}. Continue with --resume.")
        raise SystemExit(130 if name == "SIGINT" else 143)


@dataclass
class BadStepTracker:
    """Counts non-finite steps (in a row and in all) and stops training after ``max_bad`` in a row."""

    max_bad: int
    last_checkpoint: Path
    consecutive: int = 0
    total: int = 0

    def _checkpoint_note(self, first_bad: int) -> str:
        """Where the newest checkpoint is, from which step, and whether it can be trusted."""
        saved = _saved_step(self.last_checkpoint) if self.last_checkpoint.is_file() else None
        if saved is None:
            return f"No checkpoint had been written yet ({self.last_checkpoint}), so there is nothing to resume."
        if saved < first_bad:
            return (f"The newest checkpoint, {self.last_checkpoint}, is from step {saved}, before the non-finite "
                    f"steps began, but its weights may already be diverging: check the losses in metrics.csv "
                    f"up to step {saved} and, if they were rising, resume from an earlier step_*.pt instead.")
        return (f"The newest checkpoint, {self.last_checkpoint}, is from step {saved}, after the non-finite steps "
                f"began (their updates were skipped), so it may already hold diverged weights: resume from a "
                f"step_*.pt written before step {first_bad} if one exists.")

    def record(self, step: int, cause: str | None) -> str | None:
        """Note whether ``step`` (1-based) was good (``cause`` None) or skipped because ``cause`` was
        non-finite; returns the line to print for a skipped step, raises :class:`TrainingStopped`
        after ``max_bad`` skipped steps in a row."""
        if cause is None:
            self.consecutive = 0
            return None
        self.consecutive += 1
        self.total += 1
        if self.consecutive >= self.max_bad:
            first = step + 1 - self.consecutive
            raise TrainingStopped(
                f"{self.consecutive} consecutive steps ({first}-{step}) had a non-finite {cause}, so training "
                f"stopped. {self._checkpoint_note(first)} Lower train.lr, raise train.warmup_steps or "
                f"train.max_bad_steps, use train.precision=fp32 or check the data, then "
                + ("continue with --resume (or start over with --force)." if self.last_checkpoint.is_file()
                   else "run again."))
        return (f"step {step}: non-finite {cause}, update skipped ({self.consecutive} in a row; training stops "
                f"at {self.max_bad})")


def _saved_step(path: Path) -> int | None:
    """The step stored in the checkpoint at ``path`` (memory-mapped, so only that value is read), or None."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
    except Exception:  # noqa: BLE001 - a missing or unreadable file just means "no checkpoint to point at"
        return None


def check_replicas(module: torch.nn.Module, info: DistInfo) -> None:
    """Under DDP, say on rank 0 whether every process ended with the same weights (they must: a difference means
    the processes trained different models)."""
    if not info.enabled:
        return
    agree = replicas_agree(module, info)
    if info.is_main:
        tqdm.write(f"weights identical on all {info.world_size} processes" if agree else
                   f"warning: the weights differ between the {info.world_size} processes: they did not train one "
                   f"model. Only rank 0's are saved.", file=sys.stdout if agree else sys.stderr)


def finish_message(steps: int, seconds: float, device: torch.device, checkpoint: Path) -> str:
    """The line a training script prints at the end: speed, peak memory, where the checkpoint is."""
    per_step = seconds / max(steps, 1)
    return (f"done: {steps} steps in {seconds / 60:.1f} min ({per_step:.3f} s/step), peak memory "
            f"{peak_memory_mb(device):.0f} MB. Checkpoint {checkpoint}")

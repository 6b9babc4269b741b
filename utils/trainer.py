"""Pieces both training scripts share: device and precision, run folders, schedules, weight EMA,
signal handling, non-finite step tracking and the step loop with logging and checkpoints."""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import random
import resource
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

import torch
import torch.distributed as dist
from tqdm import tqdm

from utils.checkpoint import CheckpointError, UnreadableCheckpointError, load_checkpoint, remove_stale_temp_files
from utils.config import ConfigError, config_diff
from utils.distributed import DistInfo


class RunDirError(RuntimeError):
    """The run folder cannot be used as asked (exists, not writable, config changed)."""


class TrainingStopped(RuntimeError):
    """Training cannot go on (too many non-finite steps)."""


def resolve_device(spec: str, info: DistInfo) -> torch.device:
    """``auto`` -> CUDA if available else CPU; under torchrun each rank takes its local GPU."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={spec} but CUDA is not available. Use train.device=cpu or auto.")
        if device.index is None:
            device = torch.device("cuda", info.local_rank)
    return device


def device_type_of(spec: str) -> str:
    """``cuda`` or ``cpu``: the kind of device ``train.device`` asks for, known before any process starts."""
    return "cuda" if spec.startswith("cuda") or (spec == "auto" and torch.cuda.is_available()) else "cpu"


def configure_backends(device: torch.device) -> None:
    """TF32 matmuls/convs and cuDNN autotuning on CUDA; nothing to do on CPU."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 natively here (AVX512-BF16 or AMX); elsewhere it is emulated and slow."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """bf16 under ``auto`` on CUDA, on CPU only when asked; None means full fp32."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn("train.precision=bf16 on a CPU without native bf16 (AVX512-BF16 or AMX) is emulated and "
                      "several times slower than fp32: set train.precision=fp32", stacklevel=2)
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_adam(params: Any, lr: float, betas: tuple[float, float], weight_decay: float,
              device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused on CUDA."""
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay,
                             fused=device.type == "cuda")


def lr_factor(step: int, warmup_steps: int, max_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at ``step``: linear warmup, then constant or cosine to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


class ModelEMA:
    """Exponential moving average of a module's parameters (buffers are copied)."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for ema_p, p in zip(self.module.parameters(), module.parameters()):
            ema_p.lerp_(p.detach(), 1 - self.decay)
        for ema_b, b in zip(self.module.buffers(), module.buffers()):
            ema_b.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)


def set_seed(seed: int) -> None:
    """Seed Python's and torch's generators (numpy is only used with explicit generators)."""
    random.seed(seed)
    torch.manual_seed(seed)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def check_writable(folder: Path) -> None:
    """Create ``folder`` and prove a file can be written there, before any training starts."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_test"):
            pass
    except OSError as err:
        raise RunDirError(f"cannot write to the run folder '{folder}': {err}. "
                          f"Pick another folder with --run-dir, or fix its permissions / free disk space.") from err


def prepare_run_dir(run_dir: Path, config: dict[str, Any], *, resume: bool, force: bool,
                    kind: str) -> dict[str, Any] | None:
    """Check the run folder and return the checkpoint to resume from (or None for a fresh run).

    A folder holding a previous run is never overwritten unless ``force``; ``resume`` continues
    from ``checkpoints/last.pt`` and refuses a changed config unless ``force``. Temporary files left
    by a checkpoint write that was killed are removed.
    """
    checkpoints = run_dir / "checkpoints"
    last = checkpoints / "last.pt"
    has_run = any((run_dir / name).exists() for name in ("config.yaml", "metrics.csv")) or any(checkpoints.glob("*.pt"))
    if resume and not last.exists():
        print(f"--resume: no checkpoint in {checkpoints} yet; starting from step 0.")
    elif resume:
        state = _load_last(last, kind)
        differences = config_diff(state["config"], config)
        if differences and not force:
            raise RunDirError("the config differs from the one the run was started with:\n  "
                              + "\n  ".join(differences)
                              + "\nResume with the original config, or add --force to continue with the new one.")
        check_writable(run_dir)
        remove_stale_temp_files(checkpoints)
        return state
    elif has_run and not force:
        raise RunDirError(f"run folder '{run_dir}' already holds a run. Use --resume to continue it, "
                          f"--force to start over in it (its checkpoints will be overwritten), "
                          f"or --run-dir to pick another folder.")
    check_writable(run_dir)
    if checkpoints.is_dir():
        remove_stale_temp_files(checkpoints)
    return None


def _load_last(last: Path, kind: str) -> dict[str, Any]:
    """``last.pt``, or an error that points at the newest periodic checkpoint when it is unreadable."""
    try:
        return load_checkpoint(last, kind=kind)
    except UnreadableCheckpointError as err:
        periodic = sorted(last.parent.glob("step_*.pt"))
        if not periodic:
            raise
        raise CheckpointError(f"{err}\nTo resume from the newest periodic checkpoint instead, copy "
                              f"{periodic[-1]} to {last}.") from err


def prepare_run(run_dir: Path, config: dict[str, Any], *, resume: bool, force: bool, kind: str,
                info: DistInfo) -> dict[str, Any] | None:
    """:func:`prepare_run_dir` on rank 0; the other ranks then load the checkpoint rank 0 chose."""
    state = prepare_run_dir(run_dir, config, resume=resume, force=force, kind=kind) if info.is_main else None
    if not info.enabled:
        return state
    flag = [state is not None]
    dist.broadcast_object_list(flag, src=0)
    if info.is_main or not flag[0]:
        return state
    return load_checkpoint(run_dir / "checkpoints" / "last.pt", kind=kind)


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop checks, so it can save before exiting."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal_name is not None:  # a second Ctrl-C exits at once
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

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


@dataclass
class BadStepTracker:
    """Counts non-finite steps (in a row and in all) and stops training after ``max_bad`` in a row."""

    max_bad: int
    consecutive: int = 0
    total: int = 0

    def record(self, step: int, cause: str | None, last_checkpoint: Path) -> None:
        """Note whether ``step`` (0-based) was good (``cause`` None) or skipped because ``cause`` was non-finite."""
        if cause is None:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        if self.consecutive >= self.max_bad:
            first = step + 2 - self.consecutive
            raise TrainingStopped(
                f"{self.consecutive} consecutive steps ({first}-{step + 1}) had a non-finite {cause}, so training "
                f"stopped. The last good checkpoint is {last_checkpoint}. Lower train.lr, raise "
                f"train.warmup_steps or train.max_bad_steps, use train.precision=fp32 or check the data, then "
                f"continue with --resume.")


class TensorSnapshot:
    """Copies of tensors that a forward pass changes in place (codebook statistics and restarts,
    BatchNorm statistics, LeCam anchors), so that a skipped step can be undone completely."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors
        self.saved: list[torch.Tensor] = []

    def take(self) -> None:
        self.saved = [t.detach().clone() for t in self.tensors]

    @torch.no_grad()
    def restore(self) -> None:
        for tensor, saved in zip(self.tensors, self.saved):
            tensor.copy_(saved)


def first_nonfinite(values: dict[str, float]) -> str | None:
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            return name
    return None


@dataclass
class LoopSettings:
    start_step: int
    max_steps: int
    log_every: int
    sample_every: int
    ckpt_every: int
    max_bad_steps: int
    desc: str
    checkpoint_dir: Path
    postfix_keys: tuple[str, ...] = field(default=())


def run_loop(settings: LoopSettings, info: DistInfo, device: torch.device, *,
             train_step: Callable[[int], dict[str, float]],
             save: Callable[[int, bool], None],
             log: Callable[[int, dict[str, float]], None],
             sample: Callable[[int], None],
             items_per_step: int) -> int:
    """Run optimizer steps from ``start_step`` to ``max_steps``; returns the step reached.

    ``train_step(step)`` performs one optimizer step and returns float logs; a log named
    ``nonfinite`` (the name of the bad quantity) marks a skipped step. ``save(step, periodic)``
    writes checkpoints. On SIGINT/SIGTERM the loop saves ``last.pt`` and exits with code 130/143.
    """
    tracker = BadStepTracker(settings.max_bad_steps)
    step = settings.start_step
    bar = tqdm(total=settings.max_steps, initial=step, desc=settings.desc, disable=not info.is_main,
               dynamic_ncols=True, file=sys.stdout)
    window_start, window_items = time.perf_counter(), 0
    with StopRequest() as stop:
        while step < settings.max_steps:
            logs = train_step(step)
            cause = logs.pop("nonfinite", None)
            if cause is not None and info.is_main:
                bar.write(f"step {step + 1}: non-finite {cause}, update skipped "
                          f"({tracker.consecutive + 1} in a row; training stops at {settings.max_bad_steps})")
            tracker.record(step, cause, settings.checkpoint_dir / "last.pt")
            step += 1
            window_items += items_per_step
            bar.update(1)
            if step % settings.log_every == 0 or step == settings.max_steps:
                elapsed = time.perf_counter() - window_start
                logs["items_per_s"] = window_items / max(elapsed, 1e-9)
                logs["bad_steps"] = float(tracker.total)
                window_start, window_items = time.perf_counter(), 0
                bar.set_postfix({k: f"{logs[k]:.4g}" for k in settings.postfix_keys if k in logs})
                log(step, logs)
            periodic = settings.ckpt_every > 0 and step % settings.ckpt_every == 0
            if periodic or step == settings.max_steps:
                save(step, periodic)
            if settings.sample_every > 0 and step % settings.sample_every == 0:
                sample(step)
            if stop.requested(info, device):
                save(step, False)
                bar.close()
                name = stop.signal_name or "a stop signal in another process"
                if info.is_main:
                    print(f"\nReceived {name}: saved {settings.checkpoint_dir / 'last.pt'} at step {step}. "
                          f"Continue with --resume.")
                raise SystemExit(130 if name == "SIGINT" else 143)
    bar.close()
    return step


@contextlib.contextmanager
def clean_exit(*user_errors: type[Exception]) -> Iterator[None]:
    """Report errors a user can fix as one paragraph on stderr instead of a traceback.

    Config, checkpoint, run-folder and the given ``user_errors`` exit with code 2; a run stopped
    by non-finite steps exits with 1; a second Ctrl-C with 130.
    """
    try:
        yield
    except TrainingStopped as err:
        _exit(1, f"training stopped: {err}")
    except (ConfigError, CheckpointError, RunDirError, *user_errors) as err:
        _exit(2, f"error: {err}")
    except KeyboardInterrupt:
        _exit(130, "interrupted before a checkpoint could be saved; the previous checkpoints are intact. "
                   "Continue with --resume.")


def _exit(code: int, message: str) -> NoReturn:
    print(message, file=sys.stderr, flush=True)
    raise SystemExit(code)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far: max allocated on CUDA, peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def finish_message(steps: int, seconds: float, device: torch.device, checkpoint: Path) -> str:
    """The line a training script prints at the end: speed, peak memory, where the checkpoint is."""
    per_step = seconds / max(steps, 1)
    return (f"done: {steps} steps in {seconds / 60:.1f} min ({per_step:.3f} s/step), peak memory "
            f"{peak_memory_mb(device):.0f} MB. Checkpoint {checkpoint}")


def describe_environment(device: torch.device, info: DistInfo) -> str:
    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({threads} threads)"
    return f"{device} [{where}], {info.world_size} process(es), pid {os.getpid()}"


def training_parser(description: str) -> argparse.ArgumentParser:
    """The command line both training scripts share: config, run folder, resume, overrides."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/quickstart.yaml")
    parser.add_argument("--run-dir", default=None, help="run folder (default: runs/<config name>)")
    parser.add_argument("--resume", action="store_true", help="continue from <run-dir>/checkpoints/last.pt")
    parser.add_argument("--force", action="store_true",
                        help="start over in an existing run folder, or resume with a changed config")
    parser.add_argument("overrides", nargs="*", help="config overrides such as train.lr=1e-4 data.root=/data")
    return parser


def default_run_dir(config_path: str, run_dir: str | None) -> Path:
    return Path(run_dir) if run_dir else Path("runs") / Path(config_path).stem

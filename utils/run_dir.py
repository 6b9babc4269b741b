"""The run folder: start a fresh run, refuse to overwrite one, or pick up a run to resume.

A folder holding a previous run is never overwritten unless ``--force``. ``--resume`` continues from
``checkpoints/last.pt``; settings that only change how the run is driven (length, logging, sampling
and checkpoint cadence, workers, device) may differ and are reported, while a changed model, data,
loss or optimizer is refused unless ``--force``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch.distributed as dist

from utils.checkpoint import CheckpointError, UnreadableCheckpointError, load_checkpoint, remove_stale_temp_files
from utils.config import config_diff
from utils.distributed import DistInfo
from utils.training import lr_factor

RESUMABLE_CHANGES = {
    "train": {"max_steps", "log_every", "sample_every", "ckpt_every", "num_sample_images", "max_bad_steps",
              "device", "compile"},
    "data": {"num_workers"},
}


class RunDirError(RuntimeError):
    """The run folder cannot be used as asked (exists, not writable, config changed)."""


def default_run_dir(config_path: str, run_dir: str | None) -> Path:
    return Path(run_dir) if run_dir else Path("runs") / Path(config_path).stem


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

    Temporary files left by a checkpoint write that was killed are removed.
    """
    checkpoints = run_dir / "checkpoints"
    last = checkpoints / "last.pt"
    has_run = any((run_dir / name).exists() for name in ("config.yaml", "metrics.csv")) or any(checkpoints.glob("*.pt"))
    if resume and not last.exists():
        print(f"--resume: no checkpoint in {checkpoints} yet; starting from step 0.")
    elif resume:
        state = _load_last(last, kind)
        _check_resume_changes(state, config, force)
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


def _check_resume_changes(state: dict[str, Any], config: dict[str, Any], force: bool) -> None:
    """Print the settings a resumed run changes; refuse changes to what was trained unless ``force``."""
    saved = state["config"]
    driving = {section: {k: v for k, v in values.items() if k in RESUMABLE_CHANGES.get(section, set())}
               for section, values in config.items()}
    frozen = config_diff(_overlay(saved, driving), config)
    if frozen and not force:
        raise RunDirError("the config differs from the one the run was started with:\n  " + "\n  ".join(frozen)
                          + "\nResume with the original config, or add --force to continue with the new one.")
    changed = config_diff(saved, config)
    if changed:
        print("resuming with changed settings:\n  " + "\n  ".join(changed))
    note = _schedule_note(saved.get("train") or {}, config.get("train") or {}, int(state["step"]))
    if note:
        print(note)


def _overlay(saved: dict[str, Any], driving: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``saved`` with the resumable keys taken from the new config."""
    merged = {section: dict(values or {}) for section, values in saved.items()}
    for section, values in driving.items():
        merged.setdefault(section, {}).update(values)
    return merged


def _schedule_note(old: dict[str, Any], new: dict[str, Any], step: int) -> str | None:
    """What a changed ``train.max_steps`` does to a cosine learning-rate schedule at the resumed step."""
    if new.get("lr_schedule") != "cosine" or old.get("max_steps") == new.get("max_steps"):
        return None
    before, after = (lr_factor(step, cfg["warmup_steps"], cfg["max_steps"], "cosine", cfg["min_lr_ratio"]) * cfg["lr"]
                     for cfg in (old, new))
    return (f"the cosine schedule now decays over {new['max_steps']} steps instead of {old['max_steps']}: "
            f"at step {step} the learning rate goes from {before:.3g} to {after:.3g}, then decays to "
            f"{new['lr'] * new['min_lr_ratio']:.3g} at step {new['max_steps']}.")


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

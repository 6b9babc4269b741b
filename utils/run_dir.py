"""The run folder: start a fresh run, refuse to overwrite one, or pick up a run to resume.

A training marks its folder as a run folder with the file ``.vqgan-run`` before it writes anything
else. Only a marked folder is ever cleared: a folder that holds files a run would write (``config.yaml``,
``metrics.csv``, ``checkpoints/*.pt``, ``samples/*.png``, ``plots/*.png``, TensorBoard events) but no
mark was filled by someone else, and every script refuses it, ``--force`` included, naming those files.
A marked folder holding a previous run is never overwritten unless ``--force``, which first removes the
previous run's checkpoints, sample grids, plots, TensorBoard events, metrics and config (and nothing
else). ``--resume`` continues from ``checkpoints/last.pt`` (a run folder written before runs were marked
is recognised by that checkpoint and marked then); settings that only change how the run is driven
(length, logging, sampling and checkpoint cadence, workers, device) may differ and are reported, while
a changed model, data, loss or optimizer is refused unless ``--force``.

While a training uses the folder it holds ``run.lock`` (pid and host), so a second training in the
same folder refuses to start; a lock whose process is gone is taken over. A run that ends before its
first checkpoint (a bad value, an unreadable image) removes what it wrote, so it can simply be rerun.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from utils.checkpoint import CheckpointError, UnreadableCheckpointError, load_checkpoint, remove_stale_temp_files
from utils.config import config_diff
from utils.distributed import DistInfo, broadcast_from_main, on_every_rank
from utils.training import lr_factor

RESUMABLE_CHANGES = {
    "train": {"max_steps", "log_every", "sample_every", "ckpt_every", "num_sample_images", "max_bad_steps",
              "device", "compile"},
    "data": {"num_workers"},
}


RUN_FILES = ("config.yaml", "metrics.csv")
# what a run writes into its folder's subfolders: the only files --force removes there
RUN_OUTPUTS = {"checkpoints": ("*.pt", ".*.tmp[0-9]*"), "samples": ("*.png",), "plots": ("*.png",),
               "tensorboard": ("events.out.tfevents.*",)}
LOCK_NAME = "run.lock"
MARKER_NAME = ".vqgan-run"


class RunDirError(RuntimeError):
    """The run folder cannot be used as asked (exists, not writable, config changed, in use)."""


def default_run_dir(config_path: str, run_dir: str | None) -> Path:
    return Path(run_dir) if run_dir else Path("runs") / Path(config_path).stem


def prove_writable(folder: Path) -> None:
    """Create ``folder`` and write (and remove) a file in it: OSError now, not when a long job ends."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_test"):
        pass


def check_writable(folder: Path) -> None:
    """:func:`prove_writable` for a run folder, before any training starts."""
    try:
        prove_writable(folder)
    except OSError as err:
        raise RunDirError(f"cannot write to the run folder '{folder}': {err}. "
                          f"Pick another folder with --run-dir, or fix its permissions / free disk space.") from err


def prepare_run_dir(run_dir: Path, config: dict[str, Any], *, resume: bool, force: bool,
                    kind: str) -> dict[str, Any] | None:
    """Check the run folder, mark it as a run folder and return the checkpoint to resume from (or None).

    Temporary files left by a checkpoint write that was killed are removed.
    """
    checkpoints = run_dir / "checkpoints"
    last = checkpoints / "last.pt"
    if resume and last.exists():
        state = _load_last(last, kind)  # a checkpoint of this kind: the folder is a run's, marked or not
        _check_resume_changes(state, config, force)
        check_writable(run_dir)
        mark_run_dir(run_dir, kind)
        remove_stale_temp_files(checkpoints)
        return state
    previous = run_outputs(run_dir)
    if previous and not is_marked(run_dir):
        shown = "\n  ".join(str(path) for path in previous[:10])
        more = f"\n  ... and {len(previous) - 10} more" if len(previous) > 10 else ""
        raise RunDirError(f"run folder '{run_dir}' was not created by a training run (it has no {MARKER_NAME} "
                          f"file), but it holds files that a run writes and --force would remove:\n  {shown}{more}\n"
                          f"They are not this repository's to overwrite, so nothing was changed. Pick another "
                          f"folder with --run-dir, or move those files away.")
    if resume:
        print(f"--resume: no checkpoint in {checkpoints} yet; starting from step 0.")
    elif previous and not force:
        raise RunDirError(f"run folder '{run_dir}' already holds a run. Use --resume to continue it, "
                          f"--force to start over in it (its checkpoints, samples and metrics are removed), "
                          f"or --run-dir to pick another folder.")
    elif previous:
        remove_previous_run(run_dir)
    check_writable(run_dir)
    mark_run_dir(run_dir, kind)
    if checkpoints.is_dir():
        remove_stale_temp_files(checkpoints)
    return None


def run_outputs(run_dir: Path) -> list[Path]:
    """The files in ``run_dir`` that a run writes (see ``RUN_FILES`` and ``RUN_OUTPUTS``), sorted."""
    found = [run_dir / name for name in RUN_FILES if (run_dir / name).is_file()]
    for folder, patterns in RUN_OUTPUTS.items():
        found += [path for pattern in patterns for path in (run_dir / folder).glob(pattern) if path.is_file()]
    return sorted(found)


def is_marked(run_dir: Path) -> bool:
    """Whether a training run created ``run_dir`` (it holds the marker file)."""
    return (run_dir / MARKER_NAME).is_file()


def mark_run_dir(run_dir: Path, kind: str) -> None:
    """Write the marker that makes ``run_dir`` a run folder (kept when it is there already)."""
    if not is_marked(run_dir):
        (run_dir / MARKER_NAME).write_text(json.dumps({"kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
                                           + "\n")


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
        return load_checkpoint(last, kind=kind, resume=True)
    except UnreadableCheckpointError as err:
        periodic = sorted(last.parent.glob("step_*.pt"))
        if not periodic:
            raise
        raise CheckpointError(f"{err}\nTo resume from the newest periodic checkpoint instead, copy "
                              f"{periodic[-1]} to {last}.") from err


def prepare_run(run_dir: Path, config: dict[str, Any], *, resume: bool, force: bool, kind: str,
                info: DistInfo) -> dict[str, Any] | None:
    """:func:`prepare_run_dir` on rank 0, whose checkpoint to resume from (or None) is then sent to every rank:
    the other ranks, on this node or another one, need no copy of the run folder."""
    with on_every_rank(info):
        state = prepare_run_dir(run_dir, config, resume=resume, force=force, kind=kind) if info.is_main else None
    return broadcast_from_main(state, info)


def remove_previous_run(run_dir: Path) -> None:
    """Delete what a previous run wrote into the marked ``run_dir`` (see :func:`run_outputs`), saying what."""
    if not is_marked(run_dir):
        raise RunDirError(f"refusing to clear '{run_dir}': it is not a run folder (no {MARKER_NAME} file).")
    removed = run_outputs(run_dir)
    for path in removed:
        path.unlink()
    for folder in RUN_OUTPUTS:
        with contextlib.suppress(OSError):  # kept when the user put other files there
            (run_dir / folder).rmdir()
    if removed:
        print(f"--force: removed the previous run's {len(removed)} files from {run_dir} (checkpoints, samples, "
              f"plots, metrics, config).")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def acquire_lock(run_dir: Path) -> Path:
    """Create ``run_dir/run.lock`` holding this pid and host (atomically, O_EXCL), or raise RunDirError naming
    the process that holds it. A lock of a process on this host that no longer exists is taken over."""
    path = run_dir / LOCK_NAME
    mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            if holder is None or holder.get("host") != socket.gethostname() or _process_alive(holder["pid"]):
                who = (f"process {holder['pid']} on host {holder['host']}" if holder is not None
                       else "another process (its lock file is unreadable)")
                raise RunDirError(f"run folder '{run_dir}' is in use by {who}: two trainings in one folder would "
                                  f"overwrite each other. Wait for it to finish, stop it, or pick another folder "
                                  f"with --run-dir; if that process is gone, delete {path}.") from None
            print(f"note: taking over {path}, left by process {holder['pid']}, which no longer runs.")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(mine)
        return path
    raise RunDirError(f"could not take the lock {path}: another process keeps creating it. Pick another "
                      f"folder with --run-dir.")


def _read_lock(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int):
        return None
    return holder


def release_lock(path: Path) -> None:
    """Remove the lock file if this process still holds it."""
    holder = _read_lock(path)
    if holder is not None and holder["pid"] == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def claim_run_dir(run_dir: Path, info: DistInfo) -> Iterator[None]:
    """Hold the run folder's lock (rank 0 only) while the body trains, and release it however the body ends.

    A SIGTERM before the training loop takes over signals ends the process through this block too. If
    the body fails before ``checkpoints/last.pt`` exists, the run files it created (see ``RUN_FILES`` and
    ``RUN_OUTPUTS``) and the folder itself, when it made it, are removed again.
    """
    if not info.is_main:
        yield
        return
    created = not run_dir.exists()
    check_writable(run_dir)
    before = {path.name for path in run_dir.iterdir()}
    started = time.time_ns()
    lock = acquire_lock(run_dir)
    previous_handler = _exit_on_sigterm()
    try:
        yield
    except BaseException:
        if not (run_dir / "checkpoints" / "last.pt").exists():
            _remove_new_run_files(run_dir, before, started)
        raise
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
        release_lock(lock)
        if created:
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only when nothing is left in it


def _exit_on_sigterm() -> Any:
    """Make SIGTERM raise SystemExit(143) (so cleanup runs); returns the previous handler, None off the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(143)

    return signal.signal(signal.SIGTERM, stop)


def _remove_new_run_files(run_dir: Path, before: set[str], started: int) -> None:
    """Remove the run files and outputs written into ``run_dir`` since ``started`` (ns): new folders whole, files
    in folders that were there before only when written since then."""
    for name in (*RUN_FILES, MARKER_NAME):
        path = run_dir / name
        if path.is_file() and (name not in before or path.stat().st_mtime_ns >= started):
            path.unlink()
    for name, patterns in RUN_OUTPUTS.items():
        folder = run_dir / name
        if name not in before:
            shutil.rmtree(folder, ignore_errors=True)
            continue
        for path in (p for pattern in patterns for p in folder.glob(pattern)):
            if path.is_file() and path.stat().st_mtime_ns >= started:
                path.unlink()

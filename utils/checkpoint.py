"""Checkpoints: plain dicts written atomically and read back with ``weights_only=True``.

A checkpoint holds tensors and plain Python values only (config as a dict, step, RNG states,
optimizer states), so opening one cannot run code. Writes go to a temporary file that is flushed,
fsync'd and renamed over the target, so a crash at any moment leaves the previous file intact.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes zip archives
# What each kind of checkpoint must hold to be used (``load_checkpoint``) and, on top, to be resumed.
REQUIRED_ENTRIES = {
    "vqgan": {"model": dict, "model_config": dict},
    "transformer": {"model": dict, "prior_config": dict, "vqgan": dict, "vqgan_config": dict},
}
COMMON_ENTRIES = {"kind": str, "config": dict, "step": int}
RESUME_ENTRIES = {
    "vqgan": {"rng": dict, "disc": dict, "opt_ae": dict, "opt_disc": dict, "lecam": dict},
    "transformer": {"rng": dict, "optimizer": dict},
}
KIND_HELP = {
    "vqgan": "a stage-1 (VQGAN) checkpoint, written by train_vqgan.py",
    "transformer": "a stage-2 (GPT prior) checkpoint, written by train_transformer.py",
}


class CheckpointError(RuntimeError):
    """A file that cannot be used as the requested checkpoint."""


class UnreadableCheckpointError(CheckpointError):
    """A checkpoint file whose bytes cannot be read back (truncated, corrupt, empty)."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically (temp file, fsync, rename, fsync of the folder).

    On failure (disk full, folder removed) the previous file at ``path`` is left untouched and a
    :class:`CheckpointError` says so.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except (OSError, RuntimeError) as err:  # torch.save reports failed writes as RuntimeError
        raise CheckpointError(f"could not write '{path}': {_write_failure(err)}. Free disk space or fix the folder's "
                              f"permissions; the previous version of the file, if any, is intact.") from err
    finally:
        tmp.unlink(missing_ok=True)


def read_cached(path: Path, what: str, redo: str) -> dict[str, Any] | None:
    """The plain dict of tensors and numbers cached at ``path`` (read with ``weights_only``), or None when there is
    none; an unreadable file is ignored with a warning that names ``what`` it held and says it is ``redo`` again."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
        warnings.warn(f"{what} {path} is unreadable ({str(err).splitlines()[0]}); {redo} again.", stacklevel=3)
        return None


def _write_failure(err: Exception) -> str:
    """A failed write in plain words: torch.save's zip writer reports them as ``[enforce fail at
    inline_container.cc:N] ... file write failed`` without the reason, which is nearly always a full disk."""
    text = str(err)
    if isinstance(err, RuntimeError) and ("enforce fail" in text or "PytorchStreamWriter" in text):
        return "the file could not be written (the disk is probably full, or it filled up during the write)"
    return text.splitlines()[0] if text else type(err).__name__


def training_checkpoint(kind: str, step: int, config: dict[str, Any], **parts: Any) -> dict[str, Any]:
    """The dict every training checkpoint shares (kind, format, step, config, RNG) plus ``parts``."""
    return {"kind": kind, "format_version": FORMAT_VERSION, "step": step, "config": config,
            "rng": rng_state(), **parts}


def load_checkpoint(path: str | Path, kind: str | None = None, map_location: Any = "cpu",
                    resume: bool = False) -> dict[str, Any]:
    """Load a checkpoint safely and check it as a whole: of the expected ``kind``, holding every entry
    that kind needs with the right type (with ``resume``, also the optimizer and RNG states)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist. Check the path (run folders keep them in "
                              f"runs/<name>/checkpoints/last.pt).")
    with open(path, "rb") as handle:
        head = handle.read(len(ZIP_MAGIC))
    if head != ZIP_MAGIC:
        what = "is empty" if not head else "is not a file written by torch.save"
        raise UnreadableCheckpointError(f"'{path}' {what}, so it is not a checkpoint. Check the path; training "
                                        f"writes checkpoints to runs/<name>/checkpoints/.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"checkpoint '{path}' needs arbitrary code to unpickle and was refused for safety "
            f"(only plain tensors and Python values are loaded){_refusal_detail(err)}. If you trust the file, "
            f"load it once with torch.load(..., weights_only=False) and re-save a plain dict of tensors."
        ) from err
    except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile, OSError) as err:
        raise UnreadableCheckpointError(
            f"'{path}' is truncated or corrupt and cannot be read ({str(err).splitlines()[0]}). "
            f"If training was interrupted, use the previous periodic checkpoint in the same folder."
        ) from err
    if not isinstance(state, dict) or "kind" not in state or "model" not in state:
        raise CheckpointError(f"'{path}' was written by torch.save but is not a checkpoint of this project "
                              f"(no 'kind'/'model' entries). Pass a file written by train_vqgan.py or "
                              f"train_transformer.py.")
    if state.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise CheckpointError(f"'{path}' has checkpoint format {state['format_version']}, newer than this code "
                              f"reads ({FORMAT_VERSION}). Update the code to the version that wrote it.")
    if state["kind"] not in REQUIRED_ENTRIES:
        raise CheckpointError(f"'{path}' names its kind {state['kind']!r}, which this code does not know "
                              f"(it writes {' and '.join(map(repr, REQUIRED_ENTRIES))}). Pass a file written by "
                              f"train_vqgan.py or train_transformer.py.")
    if kind is not None and state["kind"] != kind:
        found = KIND_HELP.get(state["kind"], repr(state["kind"]))
        raise CheckpointError(f"'{path}' is {found}, but {KIND_HELP.get(kind, kind)} is needed here. "
                              f"Check which file you passed.")
    expected = {**COMMON_ENTRIES, **REQUIRED_ENTRIES[state["kind"]],
                **(RESUME_ENTRIES[state["kind"]] if resume else {})}
    wrong = [f"'{name}' ({'missing' if name not in state else 'a ' + type(state[name]).__name__})"
             for name, expected_type in expected.items()
             if not isinstance(state.get(name), expected_type) or isinstance(state.get(name), bool)]
    if wrong:
        needed = ", ".join(f"{name} ({expected_type.__name__})" for name, expected_type in expected.items())
        raise CheckpointError(f"'{path}' is {KIND_HELP[state['kind']]}, but incomplete: {', '.join(wrong)}. "
                              f"{'Resuming needs' if resume else 'It needs'} {needed}. It was edited or written by "
                              f"other code; pass a checkpoint as the training scripts write it.")
    return state


def _refusal_detail(err: pickle.UnpicklingError) -> str:
    """The object torch refused to import, e.g. ``posix.system``, as named in its error message."""
    match = re.search(r"GLOBAL (\S+)", str(err))
    return f": it asks to import {match.group(1)}" if match else ""


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete temporary files that writes killed mid-way left in ``folder``; returns what was removed."""
    stale = sorted(Path(folder).glob(".*.tmp[0-9]*"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def load_state_dict_checked(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` that lists every missing, unexpected and mis-shaped key on mismatch."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state_dict)) if own[k].shape != state_dict[k].shape]
    if missing or unexpected or shapes:
        lines = [f"the weights in {source} do not match the model built from the config:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                shown = items[:10] + ([f"... and {len(items) - 10} more"] if len(items) > 10 else [])
                lines.append(f"  {title}: " + "; ".join(shown))
        lines.append("Use the config the checkpoint was trained with (it is stored inside the checkpoint).")
        raise CheckpointError("\n".join(lines))
    module.load_state_dict(state_dict)


def rng_state() -> dict[str, Any]:
    """RNG states of Python and torch (CPU and CUDA) as plain values and tensors."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _python_state_to_plain(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_plain_to_python_state(state["python"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_plain(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _plain_to_python_state(state: list) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss

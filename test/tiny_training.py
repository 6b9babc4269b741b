"""Tiny configs and helpers shared by the training-script tests (runs of a few steps on 16x16 images)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent

STAGE1 = {
    "data": {"name": "builtin", "image_size": 16, "channels": 3, "num_samples": 64, "eval_samples": 8,
             "num_workers": 0},
    "model": {"ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "z_channels": 8,
              "embed_dim": 8, "codebook_size": 16},
    "disc": {"ndf": 8, "n_layers": 1},
    "loss": {"perceptual_weight": 0.0, "disc_start": 3},
    "train": {"batch_size": 4, "max_steps": 6, "log_every": 1, "sample_every": 0, "ckpt_every": 0,
              "num_sample_images": 4, "device": "cpu"},
}

STAGE2 = {
    "data": dict(STAGE1["data"]),
    "transformer": {"n_layer": 1, "n_head": 2, "n_embd": 16, "condition": "class", "condition_dropout": 0.2,
                    "pkeep": 0.8},
    "train": {"batch_size": 4, "max_steps": 4, "lr": 1e-3, "log_every": 1, "sample_every": 0, "ckpt_every": 0,
              "num_sample_images": 4, "device": "cpu"},
    "sample": {"top_k": 8},
}


def script_fails(capsys: pytest.CaptureFixture, main: Callable[[list[str]], None], *args: object) -> str:
    """Run a script's ``main`` on ``args``; it must stop with exit code 2 and one clean ``error:`` paragraph, which
    is returned."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err
    return err[err.index("error: "):]


def write_config(folder: Path, name: str, config: dict) -> Path:
    """Write ``config`` as YAML to ``folder/name.yaml`` and return the path."""
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def load_plain(path: Path) -> dict:
    """A checkpoint exactly as a user would open it: ``torch.load(..., weights_only=True)``."""
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_tensors_equal(a: object, b: object, where: str = "state") -> None:
    """Nested dicts/lists of tensors and plain values are identical (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for key in a:
            assert_tensors_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tensors_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def script_env() -> dict[str, str]:
    """Environment for training subprocesses: one thread each, repo importable, no distributed leftovers."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    return env


def start(args: list[str], cwd: Path, stdin: int | None = None) -> subprocess.Popen:
    """Start ``python ARGS`` with stdout and stderr captured as text."""
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=script_env(), stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)

"""Bad inputs to the three scripts end in one clear `error:` paragraph (exit code 2): no traceback, no hang,
no second training in one run folder, and nothing left behind that blocks the rerun."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_training import REPO, STAGE1, STAGE2, load_plain, start, write_config

import dataloader.datasets
import generate
import train_transformer
import train_vqgan
from dataloader.folder import list_images, load_folder
from utils import checkpoint
from utils.checkpoint import CheckpointError, save_checkpoint
from utils.config import ConfigError, DataConfig, apply_overrides, building
from utils.pictures import class_rows

TIMEOUT_S = 60


def fails(main: Callable[[list[str]], None], args: list[object], capsys: pytest.CaptureFixture) -> str:
    """Run ``main(args)``, which must exit with code 2 and a message without a traceback; return stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err and "error: " in err
    return err


def stage1_config(folder: Path, **data: object) -> Path:
    config = copy.deepcopy(STAGE1)
    config["data"].update(data)
    return write_config(folder, "vqgan", config)


def image_folder(folder: Path, count: int = 12, truncated: int | None = None) -> Path:
    """``count`` random 16x16 PNGs; the ``truncated``-th one cut in half (its header still reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        path = folder / f"{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(path)
        if i == truncated:
            path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    return folder


@pytest.fixture(scope="module")
def stage1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stage-1 checkpoint after one step of the tiny config."""
    folder = tmp_path_factory.mktemp("stage1")
    train_vqgan.main(["--config", str(write_config(folder, "vqgan", STAGE1)), "--run-dir", str(folder / "run"),
                      "train.max_steps=1"])
    return folder / "run" / "checkpoints" / "last.pt"


# ----------------------------------------------------------------------------------------------- configs

@pytest.mark.parametrize("overrides, expected", [
    (["train.device=tpu"], ["train.device", "tpu", "cpu"]),
    (["model.ch_mult=[1,2,"], ["model.ch_mult=[1,2,", "not valid YAML", "e.g. model.ch_mult=[1,2,2]"]),
    (["data.num_workers=-1"], ["data.num_workers", "-1", "0 or more"]),
    (["train.num_sample_images=0"], ["train.num_sample_images", "positive"]),
    (["model.dropout=2"], ["model.dropout", "[0, 1)", "e.g. model.dropout="]),
    (["model.ch=0"], ["model.ch must be positive, got 0"]),
    (["model.ch_mult=[]"], ["model.ch_mult", "non-empty"]),
    (["model.attn_resolutions=[5]"], ["model.attn_resolutions=[5]", "data.image_size=16", "[16, 8]"]),
    (["data.image_size=4", "model.attn_resolutions=[8]"], ["model.attn_resolutions=[8]", "data.image_size=4"]),
    (["data.image_size=32", "disc.n_layers=6"], ["disc.n_layers=6", "data.image_size=32", "disc.n_layers=3"]),
    (["train.ckpt_every=-5"], ["train.ckpt_every", "-5", "0 or more"]),
    (["model.codebook_dim=16"], ["model.codebook_dim", "16", "model.embed_dim=8"]),
    (["train.betas=[0.5,1.5]"], ["train.betas[1]", "1.5"]),
    (["loss.disc_weight=-1"], ["loss.disc_weight", "-1"]),
    (["train.num_workers=0"], ["'train.num_workers'", "Did you mean 'data.num_workers'"]),
    (["model=3"], ["override 'model=3' must look like section.key=value"]),
    (["model.codebook_size=99999999999999999999999"], ["model.codebook_size=99999999999999999999999 is out of range"]),
    (["train.seed=99999999999999999999999"], ["train.seed=99999999999999999999999 is out of range"]),
    (["train.seed=-5"], ["train.seed must be 0 or more, got -5"]),
    (["train.lr=.inf"], ["train.lr must be a finite number, got inf"]),
    (["loss.disc_weight=nan"], ["loss.disc_weight must be a finite number, got nan"]),
    (["train.device=mps"], ["train.device must be auto, cpu, cuda or cuda:N, got mps"]),
    (["train.dist_timeout=0"], ["train.dist_timeout must be positive"]),
    (["model.codebook_size=1000000000000"], ["out of memory", "model.codebook_size"]),
])
def test_bad_stage1_values_name_the_key(tmp_path: Path, capsys: pytest.CaptureFixture, overrides: list[str],
                                        expected: list[str]) -> None:
    run = tmp_path / "run"
    err = fails(train_vqgan.main, ["--config", stage1_config(tmp_path), "--run-dir", run, *overrides], capsys)
    for text in expected:
        assert text in err
    assert not run.exists()


@pytest.mark.parametrize("overrides, expected", [
    (["transformer.n_layer=0"], ["transformer.n_layer must be positive, got 0"]),
    (["transformer.positions=rotary", "transformer.n_embd=18", "transformer.n_head=2"], ["even head size"]),
    (["sample.temperature=0"], ["sample.temperature", "positive"]),
    (["sample.top_p=2"], ["sample.top_p", "(0, 1]"]),
    (["train.device=tpu"], ["train.device", "tpu"]),
])
def test_bad_stage2_values_name_the_key(tmp_path: Path, capsys: pytest.CaptureFixture, overrides: list[str],
                                        expected: list[str]) -> None:
    config = write_config(tmp_path, "prior", STAGE2)
    err = fails(train_transformer.main, ["--config", config, "--run-dir", tmp_path / "run", "--vqgan",
                                         tmp_path / "none.pt", *overrides], capsys)
    for text in expected:
        assert text in err


def test_config_file_that_is_not_a_mapping(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bare = tmp_path / "bare.yaml"
    bare.write_text("just a sentence\n")
    err = fails(train_vqgan.main, ["--config", bare, "train.lr=1e-4"], capsys)
    assert "bare.yaml' must hold a mapping of sections" in err and "str" in err


@pytest.mark.parametrize("text, expected", [
    ("1: {ch: 32}\n", "unknown config section '1'"),
    ("model:\n  ch: 32\nmodel:\n  codebook_size: 512\n",
     "the key 'model' appears twice in one mapping (lines 1 and 3)"),
    ("train:\n  lr: 0.1\n  lr: 0.2\n", "the key 'lr' appears twice in one mapping (lines 2 and 3)"),
    ("", "holds no settings (it is empty or only comments)"),
    ("# only a comment\n", "holds no settings"),
])
def test_config_files_that_would_silently_mislead(tmp_path: Path, capsys: pytest.CaptureFixture, text: str,
                                                  expected: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(text)
    assert expected in fails(train_vqgan.main, ["--config", config, "--run-dir", tmp_path / "run"], capsys)
    assert not (tmp_path / "run").exists()


def test_config_flag_given_twice_or_naming_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = stage1_config(tmp_path)
    err = fails(train_vqgan.main, ["--config", config, "--config", config, "--run-dir", tmp_path / "run"], capsys)
    assert "--config was given twice" in err
    err = fails(train_vqgan.main, ["--config", tmp_path, "--run-dir", tmp_path / "run"], capsys)
    assert f"config file '{tmp_path}' is a folder" in err
    os.mkfifo(tmp_path / "pipe.yaml")
    err = fails(train_vqgan.main, ["--config", tmp_path / "pipe.yaml", "--run-dir", tmp_path / "run"], capsys)
    assert "pipe.yaml' is not a regular file" in err
    with pytest.raises(ConfigError, match="appears twice"):
        apply_overrides({}, ["train.betas={a: 1, a: 2}"])


@pytest.mark.parametrize("script, config, other", [
    (train_vqgan.main, STAGE2, "stage-2 config (for train_transformer.py)"),
    (train_transformer.main, STAGE1, "stage-1 config (for train_vqgan.py)"),
])
def test_config_of_the_other_stage_is_named_as_such(tmp_path: Path, capsys: pytest.CaptureFixture, script, config,
                                                     other: str) -> None:
    path = write_config(tmp_path, "other", config)
    err = fails(script, ["--config", path, "--run-dir", tmp_path / "run", "--vqgan", tmp_path / "x.pt"]
                if script is train_transformer.main else ["--config", path, "--run-dir", tmp_path / "run"], capsys)
    assert other in err and "Did you mean" not in err


def test_constructor_value_errors_become_config_errors() -> None:
    with pytest.raises(ConfigError, match="stage-1 model that cannot be built: bad width"):
        with building("stage-1 model"):
            raise ValueError("bad width")
    with pytest.raises(TypeError):  # programming errors stay what they are
        with building("stage-1 model"):
            raise TypeError("a bug")


def test_constructor_error_that_passes_validation_exits_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def refuses(*args: object, **kwargs: object) -> None:
        raise ValueError("this combination of options is not supported")

    monkeypatch.setattr("vqgan.config.Discriminator", refuses)
    err = fails(train_vqgan.main, ["--config", stage1_config(tmp_path), "--run-dir", tmp_path / "run"], capsys)
    assert "cannot be built: this combination of options is not supported" in err
    assert not (tmp_path / "run").exists()


def test_stage1_checkpoint_with_an_unknown_model_key(stage1: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    state = load_plain(stage1)
    state["model_config"]["wavelets"] = True
    future = tmp_path / "future.pt"
    torch.save(state, future)
    config = write_config(tmp_path, "prior", STAGE2)
    err = fails(train_transformer.main, ["--config", config, "--run-dir", tmp_path / "run", "--vqgan", future], capsys)
    assert str(future) in err and "'wavelets'" in err


# ------------------------------------------------------------------------------------------------- data

def test_bad_image_in_a_worker_ends_the_run_without_a_hang(tmp_path: Path) -> None:
    images = image_folder(tmp_path / "images", truncated=3)
    config = stage1_config(tmp_path, name="folder", root=str(images), num_workers=2, eval_samples=1)
    run = tmp_path / "run"
    process = start([str(REPO / "train_vqgan.py"), "--config", str(config), "--run-dir", str(run)], tmp_path)
    try:
        _, err = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail("the run did not end after a worker failed")
    assert process.returncode == 2, err
    assert "Traceback" not in err and "DataLoader worker" not in err
    assert err.strip().splitlines()[-1].startswith(f"error: cannot read image '{images / '03.png'}'")
    assert not run.exists()  # nothing left to block the rerun


def test_failed_start_leaves_the_folder_as_it_was(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    images = image_folder(tmp_path / "images", truncated=3)
    config = stage1_config(tmp_path, name="folder", root=str(images), eval_samples=1)
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    err = fails(train_vqgan.main, ["--config", config, "--run-dir", run], capsys)
    assert "03.png" in err
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    image_folder(tmp_path / "images")  # the fix the message suggests; the rerun needs no --force
    train_vqgan.main(["--config", str(config), "--run-dir", str(run), "train.max_steps=1"])
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "notes.txt").is_file()


def test_symlink_loop_is_scanned_once_and_reported(tmp_path: Path) -> None:
    images = image_folder(tmp_path / "images" / "a", count=2).parent
    os.symlink("..", images / "a" / "loop")
    os.symlink(images / "a", images / "again")
    (images / "notes.txt").write_text("not an image")
    with pytest.warns(UserWarning, match=r"left out .*file\(s\) without an image extension.*2 symlinked folder"):
        found = list_images(images)
    assert found == [images / "a" / "00.png", images / "a" / "01.png"]


def test_only_regular_files_are_read(tmp_path: Path) -> None:
    images = image_folder(tmp_path / "images", count=2)
    os.mkfifo(images / "pipe.png")  # opening a named pipe for reading blocks until someone writes to it
    with pytest.warns(UserWarning, match=r"left out 1 special file\(s\) that are not regular files"):
        assert list_images(images) == [images / "00.png", images / "01.png"]


def test_unreadable_subfolder_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = image_folder(tmp_path / "images" / "a", count=2).parent
    locked = image_folder(images / "locked", count=3)
    real_scandir = os.scandir

    def scandir(path: object = "."):  # root reads every folder, so refuse this one as the kernel would a user
        if Path(os.fsdecode(path)) == locked:
            raise PermissionError(13, "Permission denied", str(locked))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.warns(UserWarning, match=rf"1 unreadable folder\(s\), whose images are not used: '{locked}' "
                                         rf"\(Permission denied\)"):
        assert list_images(images) == [images / "a" / "00.png", images / "a" / "01.png"]


def test_an_empty_class_folder_is_named(tmp_path: Path) -> None:
    images = tmp_path / "images"
    for name in ("cat", "dog"):
        image_folder(images / name, count=2)
    (images / "bird").mkdir()
    with pytest.warns(UserWarning, match=r"1 class folder\(s\) hold no images and are not classes: .*bird\. "
                                         r"The data has 2 classes \(cat, dog\)"):
        dataset = load_folder(images, "train", 16, 3, class_labels=True)
    assert dataset.class_names == ["cat", "dog"]


def test_a_file_name_that_is_not_utf8_keys_the_token_cache(stage1: Path, tmp_path: Path) -> None:
    images = image_folder(tmp_path / "images", count=3)
    os.rename(images / "01.png", os.fsencode(images) + b"/caf\xe9.png")  # Latin-1 bytes, invalid as UTF-8
    data = DataConfig(name="folder", root=str(images), image_size=16)
    assert train_transformer.token_cache_name([stage1], data, "train") == train_transformer.token_cache_name(
        [stage1], data, "train")


def test_token_cache_key_follows_the_folder_contents(stage1: Path, tmp_path: Path) -> None:
    images = image_folder(tmp_path / "images", count=3)
    data = DataConfig(name="folder", root=str(images), image_size=16)
    key = train_transformer.token_cache_name([stage1], data, "train")
    assert train_transformer.token_cache_name([stage1], data, "train") == key
    picture = images / "01.png"
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(picture)
    os.utime(picture, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = train_transformer.token_cache_name([stage1], data, "train")
    assert changed != key
    picture.rename(images / "09.png")
    assert train_transformer.token_cache_name([stage1], data, "train") not in (key, changed)



def test_token_cache_key_follows_the_builtin_renderer(stage1: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = DataConfig(name="builtin", image_size=16)
    key = train_transformer.token_cache_name([stage1], data, "train")
    monkeypatch.setattr(dataloader.datasets, "RENDER_VERSION", dataloader.datasets.RENDER_VERSION + 1)
    assert train_transformer.token_cache_name([stage1], data, "train") != key

# ------------------------------------------------------------------------------------------- run folder

def wait_for_the_first_step(run: Path, process: subprocess.Popen) -> None:
    """Wait until a run started with ``train.log_every=1`` has logged its first step: its loop is then under way,
    with its signal handlers installed (``metrics.csv`` itself is written just before the loop starts)."""
    deadline = time.monotonic() + TIMEOUT_S
    metrics = run / "metrics.csv"
    while process.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            return
        time.sleep(0.05)


def lock_of(pid: int) -> str:
    return json.dumps({"pid": pid, "host": socket.gethostname()})


def test_second_training_in_a_busy_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = stage1_config(tmp_path)
    run = tmp_path / "run"
    first = start([str(REPO / "train_vqgan.py"), "--config", str(config), "--run-dir", str(run),
                   "train.max_steps=100000", "train.log_every=1"], tmp_path)
    try:
        wait_for_the_first_step(run, first)
        assert first.poll() is None, first.communicate()[1]
        err = fails(train_vqgan.main, ["--config", config, "--run-dir", run, "--force"], capsys)
        assert f"is in use by process {first.pid} on host {socket.gethostname()}" in err
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=TIMEOUT_S) == 143
    finally:
        first.kill()
        first.communicate()
    assert not (run / "run.lock").exists()  # released on SIGTERM
    assert (run / "checkpoints" / "last.pt").is_file()


def test_lock_of_a_process_that_is_gone_is_taken_over(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.lock").write_text(lock_of(gone.pid))
    train_vqgan.main(["--config", str(stage1_config(tmp_path)), "--run-dir", str(run), "train.max_steps=1"])
    assert f"left by process {gone.pid}, which no longer runs" in capsys.readouterr().out
    assert not (run / "run.lock").exists()


def test_lock_of_a_live_process_is_respected(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.lock").write_text(lock_of(os.getppid()))
    err = fails(train_vqgan.main, ["--config", stage1_config(tmp_path), "--run-dir", run], capsys)
    assert f"in use by process {os.getppid()}" in err and "--run-dir" in err
    assert (run / "run.lock").read_text() == lock_of(os.getppid())


def test_force_removes_the_previous_runs_outputs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config, run = stage1_config(tmp_path), tmp_path / "run"
    train_vqgan.main(["--config", str(config), "--run-dir", str(run), "train.max_steps=4", "train.ckpt_every=2",
                      "train.sample_every=2"])
    assert (run / "checkpoints" / "step_000004.pt").is_file()
    (run / "samples" / "mine.txt").write_text("kept")
    train_vqgan.main(["--config", str(config), "--run-dir", str(run), "--force", "train.max_steps=1"])
    assert "--force: removed the previous run's" in capsys.readouterr().out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["mine.txt", "step_000001.png"]


def folder_digest(folder: Path) -> dict[str, str]:
    """md5 of every file under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("flags", [["--force"], [], ["--resume"], ["--resume", "--force"]])
def test_a_folder_no_run_created_is_never_touched(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                  flags: list[str]) -> None:
    run = tmp_path / "mine"
    for name, content in (("checkpoints/mine.pt", b"weights"), ("samples/holiday.png", b"photo"),
                          ("plots/chart.png", b"chart"), ("metrics.csv", b"a,b\n1,2\n")):
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_bytes(content)
    before = folder_digest(run)
    err = fails(train_vqgan.main, ["--config", stage1_config(tmp_path), "--run-dir", run, *flags], capsys)
    assert "was not created by a training run" in err and "nothing was changed" in err
    for name in ("checkpoints/mine.pt", "samples/holiday.png", "plots/chart.png", "metrics.csv"):
        assert str(run / name) in err
    assert folder_digest(run) == before and sorted(p.name for p in run.iterdir()) == sorted(
        ["checkpoints", "samples", "plots", "metrics.csv"])


def test_a_run_folder_is_marked_and_force_works_only_there(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config, run = stage1_config(tmp_path), tmp_path / "run"
    train_vqgan.main(["--config", str(config), "--run-dir", str(run), "train.max_steps=1"])
    marker = json.loads((run / ".vqgan-run").read_text())
    assert marker["kind"] == "vqgan"
    (run / ".vqgan-run").unlink()  # a folder without the mark is not the repository's to clear
    before = folder_digest(run)
    err = fails(train_vqgan.main, ["--config", config, "--run-dir", run, "--force"], capsys)
    assert "was not created by a training run" in err and folder_digest(run) == before


# ------------------------------------------------------------------------------------ processes and signals

def test_world_size_without_torchrun_is_explained(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    err = fails(train_vqgan.main, ["--config", stage1_config(tmp_path), "--run-dir", tmp_path / "run"], capsys)
    assert "WORLD_SIZE=2 is set, but RANK and MASTER_ADDR and MASTER_PORT are not" in err and "torchrun" in err


def test_a_group_that_never_fills_ends_within_the_timeout(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    started = time.monotonic()
    err = fails(train_vqgan.main, ["--config", stage1_config(tmp_path), "--run-dir", tmp_path / "run",
                                   "train.dist_timeout=2"], capsys)
    assert time.monotonic() - started < 30
    assert f"rank 0: waiting for all 2 processes to join at 127.0.0.1:{port} (up to 2 s" in err
    assert f"rank 0 could not join the group of 2 processes at 127.0.0.1:{port} within 2 s" in err
    assert not (tmp_path / "run").exists()


def test_a_second_signal_stops_at_once_and_says_what_is_saved(tmp_path: Path) -> None:
    run = tmp_path / "run"
    process = start([str(REPO / "train_vqgan.py"), "--config", str(stage1_config(tmp_path)), "--run-dir", str(run),
                     "train.max_steps=100000", "train.log_every=1"], tmp_path)
    try:
        wait_for_the_first_step(run, process)
        process.send_signal(signal.SIGINT)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=TIMEOUT_S)
    finally:
        process.kill()
    assert process.returncode == 130 and "Traceback" not in err, err
    assert "Received SIGINT: saving a checkpoint after this step" in err
    if (run / "checkpoints" / "last.pt").is_file():  # the step had ended: saved before the second signal came
        assert "Continue with --resume" in out + err
    else:
        assert "interrupted before the first checkpoint was saved, so there is nothing to resume" in err
        assert not run.exists()


# ----------------------------------------------------------------------------------------------- others

def test_checkpoint_write_failure_in_plain_words(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fails_to_write(state: dict, handle) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(checkpoint.torch, "save", fails_to_write)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint({"kind": "vqgan", "model": {}}, tmp_path / "last.pt")
    assert "disk is probably full" in str(info.value) and "enforce fail" not in str(info.value)


def test_training_sample_grid_has_one_class_per_row() -> None:
    labels, per_row = class_rows(4, 8)
    assert per_row == 2 and labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    labels, per_row = class_rows(10, 4)
    assert per_row == 1 and labels.tolist() == [0, 1, 2, 3]


def test_generate_bad_inputs_and_outputs(stage1: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((0, 8, 8), np.int32))
    a_file = tmp_path / "taken.png"
    a_file.write_bytes(b"x")
    pickled = tmp_path / "objects.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    text = tmp_path / "notes.npy"
    text.write_text("hello")
    decode = ["tokens", "--decode", "--checkpoint", stage1, "--input"]
    cases = [
        ([*decode, empty, "--out", tmp_path / "d"], [str(empty), "no token grids"]),
        ([*decode, pickled, "--out", tmp_path / "d"], [str(pickled), "not a .npy file of integer code grids"]),
        ([*decode, text, "--out", tmp_path / "d"], [str(text), "generate.py tokens --out FILE.npy"]),
        (["reconstruct", "--checkpoint", stage1, "--input", "test", "--out", a_file],
         ["taken.png is an existing file"]),
        ([*decode, empty, "--out", a_file / "sub"], ["taken.png' is a file"]),
        (["tokens", "--checkpoint", stage1, "--input", "test", "--out", tmp_path], ["is a folder"]),
        (["reconstruct", "--checkpoint", stage1, "--input", "test", "--out", tmp_path / "r", "--device", "tpu"],
         ["--device 'tpu'"]),
    ]
    for args, expected in cases:
        err = fails(generate.main, args, capsys)
        for piece in expected:
            assert piece in err, (args, err)
        assert "allow_pickle" not in err

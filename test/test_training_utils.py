"""Loop pieces in utils/: schedules, weight EMA, signals, bad-step tracking, the training log, run folders,
clean error exits, metrics.csv, plots and the single-process side of utils/distributed.py."""

from __future__ import annotations

import math
import os
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import utils.device
import utils.logging
from utils.checkpoint import CheckpointError, save_checkpoint, training_checkpoint
from utils.config import ConfigError
from utils.device import autocast_dtype, peak_memory_mb, resolve_device
from utils.distributed import DistInfo, init_distributed, wrap_ddp
from utils.logging import MetricsLogger, TrainingLog, read_metrics
from utils.loop import BadStepTracker, StopSignal, TrainingStopped, finish_message, is_due
from utils.pictures import image_grid, plot_training_curves, save_grid, save_reconstruction_grid
from utils.run_dir import RunDirError, is_marked, prepare_run_dir
from utils.script import clean_exit
from utils.training import ModelEMA, NonFiniteCheck, TensorSnapshot, lr_factor, make_adam

SINGLE = DistInfo()
CPU = torch.device("cpu")


def test_lr_schedule_values() -> None:
    assert [lr_factor(s, 4, 100, "constant", 0.1) for s in (0, 1, 3, 4, 99)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    assert lr_factor(4, 4, 104, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(54, 4, 104, "cosine", 0.1) == pytest.approx(0.55)
    assert lr_factor(104, 4, 104, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(500, 4, 104, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(0, 0, 10, "cosine", 0.0) == pytest.approx(1.0)


def test_adamw_is_fused_on_cpu_and_steps_like_the_multi_tensor_one() -> None:
    torch.manual_seed(0)
    fused_model, plain_model = nn.Linear(4, 3), nn.Linear(4, 3)
    plain_model.load_state_dict(fused_model.state_dict())
    fused = make_adam(fused_model.parameters(), 1e-2, (0.9, 0.99), 0.1, CPU)
    plain = torch.optim.AdamW(plain_model.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    assert fused.defaults["fused"]
    x = torch.randn(8, 4)
    for _ in range(3):
        for model, optimizer in ((fused_model, fused), (plain_model, plain)):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
    for a, b in zip(fused_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_model_ema_math() -> None:
    model = nn.BatchNorm1d(2)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = ModelEMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.running_mean.fill_(5.0)
    ema.update(model, torch.tensor(False))
    assert torch.allclose(ema.module.weight, torch.full((2,), 1.2))  # 0.9 * 1 + 0.1 * 3
    assert torch.equal(ema.module.running_mean, torch.full((2,), 5.0))  # buffers are copied
    ema.update(model, torch.tensor(False))
    assert torch.allclose(ema.module.weight, torch.full((2,), 1.38))
    assert not ema.module.training and not ema.module.weight.requires_grad
    restored = ModelEMA(nn.BatchNorm1d(2), decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert torch.equal(restored.module.weight, ema.module.weight)


def test_stop_signal_turns_signals_into_a_flag_and_exits_with_the_signal_code(tmp_path: Path, capsys) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        assert not stop.requested(SINGLE, CPU)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested(SINGLE, CPU) and stop.signal_name == "SIGTERM"
        with pytest.raises(SystemExit) as info:
            stop.exit(SINGLE, tmp_path / "last.pt", 2)
        assert info.value.code == 143
        captured = capsys.readouterr()
        assert f"Received SIGTERM: saved {tmp_path / 'last.pt'} at step 2" in captured.out
        assert "Received SIGTERM: saving a checkpoint after this step, then stopping" in captured.err
        with pytest.raises(KeyboardInterrupt):  # a second signal does not wait for the loop
            os.kill(os.getpid(), signal.SIGINT)
        # and a third ends the process through the kernel, even while Python is blocked in C code
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGTERM) is before


def test_bad_step_tracker_counts_runs_of_bad_steps(tmp_path: Path) -> None:
    tracker = BadStepTracker(max_bad=2, last_checkpoint=tmp_path / "last.pt")
    assert tracker.record(1, "rec_loss") == ("step 1: non-finite rec_loss, update skipped (1 in a row; training "
                                             "stops at 2)")
    assert tracker.record(2, None) is None
    tracker.record(3, "g_loss")
    assert (tracker.consecutive, tracker.total) == (1, 2)
    with pytest.raises(TrainingStopped, match=r"2 consecutive steps \(3-4\) had a non-finite d_loss") as info:
        tracker.record(4, "d_loss")
    message = str(info.value)
    assert str(tmp_path / "last.pt") in message and "nothing to resume" in message and "run again" in message


@pytest.mark.parametrize("saved_at, expected", [(2, "from step 2, before the non-finite steps began"),
                                                (4, "from step 4, after the non-finite steps began")])
def test_bad_step_stop_names_the_step_of_the_newest_checkpoint(tmp_path: Path, saved_at: int, expected: str) -> None:
    save_checkpoint({"kind": "vqgan", "model": {}, "step": saved_at}, tmp_path / "last.pt")
    tracker = BadStepTracker(max_bad=2, last_checkpoint=tmp_path / "last.pt")
    tracker.record(3, "rec_loss")
    with pytest.raises(TrainingStopped) as info:
        tracker.record(4, "rec_loss")
    message = str(info.value)
    assert expected in message and "may already" in message and "--resume" in message
    assert "last good checkpoint" not in message


def test_tensor_snapshot_undoes_in_place_updates() -> None:
    bn = nn.BatchNorm1d(3)
    snapshot = TensorSnapshot(list(bn.buffers()))
    bn(torch.randn(8, 3) + 4)
    assert bn.running_mean.abs().sum() > 0
    snapshot.restore()
    assert torch.equal(bn.running_mean, torch.zeros(3)) and int(bn.num_batches_tracked) == 0


def test_is_due() -> None:
    assert [is_due(step, 3) for step in range(1, 7)] == [False, False, True, False, False, True]
    assert not any(is_due(step, 0) for step in range(1, 7))


def test_training_log_writes_rows_on_log_steps_and_the_last_step(tmp_path: Path) -> None:
    tracker = BadStepTracker(max_bad=3, last_checkpoint=tmp_path / "last.pt")
    with TrainingLog(tmp_path, ["lr", "loss", "items_per_s", "bad_steps"], start_step=0, max_steps=5, log_every=2,
                     items_per_step=4, desc="test", postfix_keys=("loss",), is_main=True, bad_steps=tracker) as log:
        for step in range(1, 6):
            loss = torch.tensor(math.nan if step == 3 else float(step))
            log.step(step, {"loss": loss, "ignored": torch.tensor(1.0)}, NonFiniteCheck({"loss": loss}), lr=0.1 * step)
    log.close()
    rows = read_metrics(tmp_path / "metrics.csv")
    assert rows["step"] == [2, 4, 5] and rows["loss"] == [2.0, 4.0, 5.0] and rows["bad_steps"] == [0.0, 1.0, 1.0]
    assert rows["lr"] == pytest.approx([0.2, 0.4, 0.5])
    assert all(value > 0 for value in rows["items_per_s"])
    assert log.steps_run == 5


def resumable(config: dict, step: int) -> dict:
    """The smallest stage-1 checkpoint that a run can resume from."""
    return training_checkpoint("vqgan", step, config, model={}, model_config={}, disc={}, opt_ae={}, opt_disc={},
                               lecam={})


def test_prepare_run_dir_protects_existing_runs(tmp_path: Path) -> None:
    run = tmp_path / "run"
    config = {"train": {"lr": 0.1, "max_steps": 5}}
    assert prepare_run_dir(run, config, resume=False, force=False, kind="vqgan") is None
    (run / "metrics.csv").write_text("step\n")
    with pytest.raises(RunDirError, match="already holds a run.*--resume.*--force"):
        prepare_run_dir(run, config, resume=False, force=False, kind="vqgan")
    assert prepare_run_dir(run, config, resume=False, force=True, kind="vqgan") is None

    last = run / "checkpoints" / "last.pt"
    save_checkpoint(resumable(config, 2), last)
    (last.parent / ".last.pt.tmp999").write_bytes(b"cut short")
    changed = {"train": {"lr": 0.2, "max_steps": 5}}
    with pytest.raises(RunDirError, match=r"train.lr: 0.1 -> 0.2\nResume with the original config.*--force"):
        prepare_run_dir(run, changed, resume=True, force=False, kind="vqgan")
    assert prepare_run_dir(run, changed, resume=True, force=True, kind="vqgan")["step"] == 2
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.pt"]


def test_a_run_folder_from_before_the_marker_resumes_and_is_marked(tmp_path: Path) -> None:
    config = {"train": {"lr": 0.1}}
    save_checkpoint(resumable(config, 3), tmp_path / "checkpoints" / "last.pt")
    (tmp_path / "metrics.csv").write_text("step\n")
    with pytest.raises(RunDirError, match="not created by a training run"):
        prepare_run_dir(tmp_path, config, resume=False, force=True, kind="vqgan")
    assert prepare_run_dir(tmp_path, config, resume=True, force=False, kind="vqgan")["step"] == 3
    assert is_marked(tmp_path)


def test_unreadable_last_checkpoint_points_at_the_newest_periodic_one(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    for name in ("step_000002.pt", "step_000004.pt"):
        save_checkpoint(resumable({}, 4), checkpoints / name)
    (checkpoints / "last.pt").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(CheckpointError, match="copy .*step_000004.pt to .*last.pt"):
        prepare_run_dir(tmp_path, {}, resume=True, force=False, kind="vqgan")


def test_resume_without_checkpoint_starts_fresh(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert prepare_run_dir(tmp_path / "run", {}, resume=True, force=False, kind="vqgan") is None
    assert "starting from step 0" in capsys.readouterr().out


def test_unwritable_run_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(RunDirError, match="cannot write to the run folder.*--run-dir"):
        prepare_run_dir(blocker / "run", {}, resume=False, force=False, kind="vqgan")


@pytest.mark.parametrize("error, code, prefix", [
    (ConfigError("bad key"), 2, "error: bad key"),
    (RunDirError("taken"), 2, "error: taken"),
    (TrainingStopped("nan"), 1, "training stopped: nan"),
    (KeyboardInterrupt(), 130, "interrupted."),
])
def test_clean_exit_prints_one_paragraph(error: BaseException, code: int, prefix: str,
                                         capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info, clean_exit():
        raise error
    assert info.value.code == code
    assert capsys.readouterr().err.startswith(prefix)


def test_clean_exit_lets_programming_errors_through() -> None:
    with pytest.raises(ZeroDivisionError), clean_exit(ValueError):
        raise ZeroDivisionError
    with pytest.raises(SystemExit), clean_exit(ValueError):
        raise ValueError("user error")


def test_metrics_resume_drops_rows_after_the_checkpoint(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, ["loss", "lr"], tensorboard=False)
    for step in range(1, 6):
        logger.log(step, {"loss": step / 10, "lr": 0.5})
    logger.close()
    with open(tmp_path / "metrics.csv", "a") as handle:
        handle.write("6,0.6")  # a row cut short by a kill
    with pytest.raises(KeyError, match="acc"):
        logger.log(7, {"acc": 1.0})

    resumed = MetricsLogger(tmp_path, ["loss", "lr"], resume_step=3, tensorboard=False)
    resumed.log(4, {"loss": 0.04})
    resumed.close()
    metrics = read_metrics(tmp_path / "metrics.csv")
    assert metrics["step"] == [1, 2, 3, 4]
    assert metrics["loss"] == pytest.approx([0.1, 0.2, 0.3, 0.04])
    assert metrics["lr"][:3] == [0.5] * 3 and math.isnan(metrics["lr"][3])

    fresh = MetricsLogger(tmp_path, ["loss"], tensorboard=False)
    fresh.close()
    assert (tmp_path / "metrics.csv").read_text() == "step,loss\n"


def test_image_grid_size_and_layout() -> None:
    images = torch.full((5, 1, 8, 6), -1.0)
    images[4] = 1.0
    grid = image_grid(images, nrow=3, padding=2)
    assert grid.size == (3 * (6 + 2) + 2, 2 * (8 + 2) + 2)  # (width, height)
    pixels = np.asarray(grid)
    assert pixels[2, 2].tolist() == [0, 0, 0]  # first image, grayscale repeated to RGB
    assert pixels[12, 12].tolist() == [255, 255, 255]  # fifth image: second row, second column
    assert pixels[0, 0].tolist() == [255, 255, 255]  # padding


def test_saved_grids_are_upscaled_and_reconstructions_sit_below_inputs(tmp_path: Path) -> None:
    save_grid(torch.zeros(2, 3, 4, 4), tmp_path / "g.png", nrow=2, min_size=64)
    with Image.open(tmp_path / "g.png") as image:
        assert image.size == (14 * 5, 8 * 5)  # 14x8 grid scaled by ceil(64 / 14)
    inputs, recons = torch.ones(4, 3, 4, 4), -torch.ones(4, 3, 4, 4)
    save_reconstruction_grid(inputs, recons, tmp_path / "r.png")
    with Image.open(tmp_path / "r.png") as image:
        small = image.resize((4 * 6 + 2, 2 * 6 + 2), Image.NEAREST)
        assert small.getpixel((3, 3)) == (255, 255, 255) and small.getpixel((3, 9)) == (0, 0, 0)


def test_training_curves_one_png_per_group_with_data(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, ["loss", "usage", "d_loss"], tensorboard=False)
    for step in (1, 2, 3):
        logger.log(step, {"loss": 1.0 / step, "usage": 0.5})
    logger.close()
    written = plot_training_curves(tmp_path / "metrics.csv", tmp_path / "plots",
                                   {"losses": ["loss"], "codebook": ["usage"], "gan": ["d_loss"]})
    assert sorted(p.name for p in written) == ["codebook.png", "losses.png"]
    assert all(p.stat().st_size > 1000 for p in written)


def test_single_process_distributed_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = init_distributed("cpu")
    assert info == DistInfo() and info.is_main and not info.enabled
    model = nn.Linear(2, 2)
    assert wrap_ddp(model, info, CPU) is model


def test_resumed_tensorboard_log_purges_events_after_the_checkpoint(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    created = []

    class Writer:
        def __init__(self, log_dir: str, purge_step: int | None = None) -> None:
            created.append((log_dir, purge_step))
            self.scalars = []

        def add_scalar(self, name: str, value: float, step: int) -> None:
            self.scalars.append((name, value, step))

        def close(self) -> None:
            pass

    monkeypatch.setattr(utils.logging, "SummaryWriter", Writer)
    MetricsLogger(tmp_path, ["loss"]).close()
    logger = MetricsLogger(tmp_path, ["loss"], resume_step=40)
    logger.log(41, {"loss": 0.5})
    logger.log(42, {"loss": math.nan})
    assert created == [(str(tmp_path / "tensorboard"), None), (str(tmp_path / "tensorboard"), 41)]
    assert logger.writer.scalars == [("loss", 0.5, 41)]


def test_resolve_device_names_the_fix_when_cuda_is_missing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", DistInfo()).type == "cpu"
    with pytest.raises(ConfigError, match="train.device=cpu or auto"):
        resolve_device("cuda", DistInfo())


def test_precision_picks_bf16_only_where_asked_or_on_cuda() -> None:
    assert autocast_dtype(CPU, "auto") is None
    assert autocast_dtype(CPU, "fp32") is None
    assert autocast_dtype(torch.device("cuda"), "auto") is torch.bfloat16
    assert autocast_dtype(torch.device("cuda"), "fp32") is None


def test_bf16_on_a_cpu_without_native_support_warns_with_the_fix(monkeypatch) -> None:
    monkeypatch.setattr(utils.device, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="emulated.*train.precision=fp32"):
        assert autocast_dtype(CPU, "bf16") is torch.bfloat16
    monkeypatch.setattr(utils.device, "cpu_has_native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert autocast_dtype(CPU, "bf16") is torch.bfloat16


def test_finish_message_reports_speed_peak_memory_and_checkpoint() -> None:
    message = finish_message(10, 5.0, CPU, Path("runs/x/checkpoints/last.pt"))
    assert message.startswith("done: 10 steps") and "(0.500 s/step)" in message
    assert message.endswith("Checkpoint runs/x/checkpoints/last.pt")
    assert 50 < peak_memory_mb(CPU) < 100_000  # a process that imported torch holds well over 50 MB

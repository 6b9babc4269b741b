"""train_vqgan.py end to end on a tiny model: artefacts, resume equivalence, non-finite steps, bad input."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_training import STAGE1, assert_tensors_equal, load_plain, read_rows, write_config

import train_vqgan
from utils.config import load_config, to_dict
from vqgan.config import Stage1Config

DOCUMENTED_COLUMNS = ["step", "lr", "total", "rec_loss", "p_loss", "codebook_loss", "g_loss", "d_weight", "d_loss",
                      "usage", "perplexity", "items_per_s", "bad_steps"]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path, "tiny", STAGE1)


def train(config: Path, run_dir: Path, *args: str) -> None:
    train_vqgan.main(["--config", str(config), "--run-dir", str(run_dir), *args])


def fails(config: Path, run_dir: Path, capsys: pytest.CaptureFixture, *args: str, code: int = 2) -> str:
    """Run the script expecting a clean failure; return its stderr."""
    with pytest.raises(SystemExit) as exit_info:
        train(config, run_dir, *args)
    assert exit_info.value.code == code
    return capsys.readouterr().err


def stop_with_sigterm_at(monkeypatch: pytest.MonkeyPatch, stop_step: int) -> None:
    """Deliver a real SIGTERM to this process while step ``stop_step`` is being computed."""
    real = train_vqgan.lr_factor

    def lr_factor(step: int, *rest: object) -> float:
        if step == stop_step:
            signal.raise_signal(signal.SIGTERM)
        return real(step, *rest)

    monkeypatch.setattr(train_vqgan, "lr_factor", lr_factor)


def nan_batches(monkeypatch: pytest.MonkeyPatch, bad_batches: set[int] | None = None, from_batch: int | None = None
                ) -> None:
    """Replace the images of the chosen training batches (0-based) by NaNs."""
    real = train_vqgan.infinite_batches

    def infinite_batches(loader, start_step=0):
        for position, (images, labels) in enumerate(real(loader, start_step), start=start_step):
            if (bad_batches and position in bad_batches) or (from_batch is not None and position >= from_batch):
                images = torch.full_like(images, math.nan)
            yield images, labels

    monkeypatch.setattr(train_vqgan, "infinite_batches", infinite_batches)


def all_finite(state: dict) -> bool:
    tensors = [t for part in ("model", "ema", "disc") if state.get(part) for t in state[part].values()]
    return all(torch.isfinite(t.float()).all() for t in tensors)


def test_tiny_run_writes_every_artefact(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    overrides = ["train.sample_every=3", "train.ckpt_every=3", "train.ema_decay=0.9"]
    train(config, run, *overrides)
    out = capsys.readouterr().out
    assert "encoder" in out and "M params" in out and "64 train images" in out and str(run) in out

    assert to_dict(load_config(Stage1Config, run / "config.yaml")) == to_dict(load_config(Stage1Config, config,
                                                                                          overrides))
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"last.pt", "step_000003.pt", "step_000006.pt"}
    state = load_plain(run / "checkpoints" / "last.pt")
    assert state["kind"] == "vqgan" and state["step"] == 6 and state["config"]["train"]["sample_every"] == 3
    assert state["ema"] is not None and all_finite(state)
    assert load_plain(run / "checkpoints" / "step_000003.pt")["step"] == 3

    rows = read_rows(run / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert set(DOCUMENTED_COLUMNS) <= set(rows[0])
    for row in rows:
        for column in ("lr", "total", "rec_loss", "usage", "perplexity", "items_per_s"):
            assert math.isfinite(float(row[column])), (column, row)
        assert 0 < float(row["usage"]) <= 1 and float(row["bad_steps"]) == 0
    assert float(rows[1]["d_weight"]) == 0 and rows[1]["d_loss"] == ""  # GAN off before disc_start=3
    assert float(rows[4]["d_weight"]) > 0 and math.isfinite(float(rows[4]["d_loss"]))

    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_000003.png", "step_000006.png"]
    with Image.open(run / "samples" / "step_000006.png") as grid:
        assert grid.width > grid.height  # 4 inputs above 4 reconstructions: two rows of four
    assert {p.name for p in (run / "plots").iterdir()} == {"losses.png", "gan.png", "codebook.png"}


def test_resume_gives_the_weights_of_an_uninterrupted_run(config: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    # GAN from step 3 with LeCam, weight EMA, dead-code restarts and gradient accumulation all cross the cut.
    overrides = ["train.ema_decay=0.9", "model.dead_code_steps=1", "loss.lecam_weight=0.1", "train.grad_accum=2",
                 "train.lr_schedule=cosine", "train.warmup_steps=2", "data.random_flip=true"]
    train(config, tmp_path / "full", *overrides)

    stop_with_sigterm_at(monkeypatch, stop_step=2)
    with pytest.raises(SystemExit) as exit_info:
        train(config, tmp_path / "cut", *overrides)
    assert exit_info.value.code == 143
    assert "Received SIGTERM" in capsys.readouterr().out
    assert load_plain(tmp_path / "cut" / "checkpoints" / "last.pt")["step"] == 3
    monkeypatch.undo()
    train(config, tmp_path / "cut", "--resume", *overrides)
    assert "resumed at   step 3" in capsys.readouterr().out

    full = load_plain(tmp_path / "full" / "checkpoints" / "last.pt")
    resumed = load_plain(tmp_path / "cut" / "checkpoints" / "last.pt")
    for part in ("model", "disc", "ema", "opt_ae", "opt_disc", "lecam", "step"):
        assert_tensors_equal(full[part], resumed[part], part)
    assert float(full["lecam"]["real"]) != 0
    drop_speed = [{k: v for k, v in row.items() if k != "items_per_s"}
                  for row in read_rows(tmp_path / "full" / "metrics.csv")]
    assert drop_speed == [{k: v for k, v in row.items() if k != "items_per_s"}
                          for row in read_rows(tmp_path / "cut" / "metrics.csv")]


def test_one_nan_batch_is_skipped_and_counted(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    nan_batches(monkeypatch, bad_batches={3})
    run = tmp_path / "run"
    train(config, run, "model.ema=true", "model.dead_code_steps=1", "train.ema_decay=0.5", "loss.lecam_weight=0.1")
    assert "step 4: non-finite rec_loss, update skipped" in capsys.readouterr().out
    rows = read_rows(run / "metrics.csv")
    assert [float(r["bad_steps"]) for r in rows] == [0, 0, 0, 1, 1, 1]
    assert rows[3]["rec_loss"] == "" and math.isfinite(float(rows[4]["rec_loss"]))
    state = load_plain(run / "checkpoints" / "last.pt")
    assert all_finite(state)  # the skipped forward's codebook / BatchNorm / LeCam updates were undone
    assert all(torch.isfinite(t).all() for t in state["lecam"].values())


def test_nonfinite_gradient_is_skipped(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    real = train_vqgan.build_stage1
    calls = []

    def build_models(cfg):
        model, disc, loss = real(cfg)

        def poison(grad: torch.Tensor) -> torch.Tensor:
            calls.append(1)
            return grad * math.inf if len(calls) == 2 else grad

        model.encoder.conv_in.weight.register_hook(poison)
        return model, disc, loss

    monkeypatch.setattr(train_vqgan, "build_stage1", build_models)
    run = tmp_path / "run"
    train(config, run, "train.max_steps=3")
    assert "step 2: non-finite autoencoder gradient, update skipped" in capsys.readouterr().out
    assert read_rows(run / "metrics.csv")[-1]["bad_steps"] == "1"
    assert all_finite(load_plain(run / "checkpoints" / "last.pt"))


def test_consecutive_nan_steps_stop_training(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    nan_batches(monkeypatch, from_batch=2)
    run = tmp_path / "run"
    err = fails(config, run, capsys, "train.max_bad_steps=3", "train.ckpt_every=1", "train.max_steps=10", code=1)
    last = run / "checkpoints" / "last.pt"
    assert "3 consecutive steps (3-5) had a non-finite rec_loss" in err
    assert str(last) in err and "--resume" in err and "Traceback" not in err
    assert [r["bad_steps"] for r in read_rows(run / "metrics.csv")] == ["0", "0", "1", "2"]
    state = load_plain(last)
    assert state["step"] == 4 and all_finite(state)


def test_existing_run_folder_is_not_overwritten(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    train(config, run, "train.max_steps=1")
    before = (run / "checkpoints" / "last.pt").read_bytes()
    capsys.readouterr()
    err = fails(config, run, capsys, "train.max_steps=1")
    assert "already holds a run" in err and "--resume" in err and "--force" in err
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
    train(config, run, "--force", "train.max_steps=1", "train.seed=5")
    assert load_plain(run / "checkpoints" / "last.pt")["config"]["train"]["seed"] == 5


def test_resume_with_a_changed_config_is_refused_unless_forced(config: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    train(config, run, "train.max_steps=2")
    err = fails(config, run, capsys, "--resume", "train.max_steps=3", "train.lr=0.001")
    assert "train.lr: 0.0002 -> 0.001" in err and "--force" in err
    assert "max_steps" not in err.split("started with:")[1]  # a longer run is not what is refused

    err = fails(config, run, capsys, "--resume", "--force", "train.max_steps=3", "model.codebook_size=8")
    assert "do not match the model" in err and "quantizer" in err
    assert "checkpoint (16, " in err and "model (8, " in err  # names the keys and both shapes

    train(config, run, "--resume", "--force", "train.max_steps=3", "train.lr=0.001")
    assert load_plain(run / "checkpoints" / "last.pt")["step"] == 3


def test_resume_continues_with_a_longer_run_and_new_cadence(config: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    train(config, run, "train.max_steps=2", "train.lr_schedule=cosine")
    capsys.readouterr()
    train(config, run, "--resume", "train.max_steps=4", "train.lr_schedule=cosine", "train.log_every=2",
          "train.ckpt_every=2", "data.num_workers=0")
    out = capsys.readouterr().out
    assert "resuming with changed settings" in out and "train.max_steps: 2 -> 4" in out
    assert "train.log_every: 1 -> 2" in out and "train.ckpt_every: 0 -> 2" in out
    assert "cosine schedule now decays over 4 steps instead of 2" in out and "at step 2" in out
    assert load_plain(run / "checkpoints" / "last.pt")["step"] == 4
    assert (run / "checkpoints" / "step_000004.pt").is_file()
    assert [int(r["step"]) for r in read_rows(run / "metrics.csv")] == [1, 2, 4]


def test_stage2_checkpoint_in_a_stage1_run_folder(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    last.parent.mkdir(parents=True)
    torch.save({"kind": "transformer", "model": {}, "config": {}, "step": 1, "prior_config": {}, "vqgan": {},
                "vqgan_config": {}}, last)
    err = fails(config, tmp_path / "run", capsys, "--resume")
    assert "stage-2 (GPT prior) checkpoint" in err and "stage-1 (VQGAN) checkpoint" in err and "needed" in err


def test_unwritable_run_folder_is_reported_before_training(config: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    err = fails(config, blocker / "run", capsys)
    assert "cannot write to the run folder" in err and "--run-dir" in err
    assert "VQGAN stage 1" not in capsys.readouterr().out


@pytest.mark.parametrize("overrides, expected", [
    (["train.lrr=1e-3"], ["unknown config key 'train.lrr'", "Did you mean 'train.lr'"]),
    (["train.max_steps=many"], ["train.max_steps", "expected an integer", "'many'"]),
    (["model.ch_mult=[1,2,2]", "data.image_size=18"], ["image_size=18", "not divisible", "factor 4"]),
    (["model.codebook_size=1"], ["model.codebook_size must be at least 2", "got 1"]),
    (["train.lr=-0.1"], ["train.lr must be positive", "-0.1"]),
])
def test_config_errors_name_the_key_and_the_fix(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                overrides: list[str], expected: list[str]) -> None:
    err = fails(config, tmp_path / "run", capsys, *overrides)
    assert err.startswith("error: ") and "Traceback" not in err
    for text in expected:
        assert text in err
    assert not (tmp_path / "run").exists()


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    err = fails(tmp_path / "nope.yaml", tmp_path / "run", capsys)
    assert "nope.yaml' does not exist" in err and "configs/quickstart.yaml" in err


def test_disc_start_beyond_max_steps_warns(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    train(config, tmp_path / "run", "train.max_steps=1", "loss.disc_start=50")
    err = capsys.readouterr().err
    assert "warning: loss.disc_start=50 is not below train.max_steps=1" in err and "disc_weight=0" in err


def test_data_and_weight_file_errors_exit_cleanly(config: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "no_images"
    empty.mkdir()
    err = fails(config, tmp_path / "run1", capsys, "data.name=folder", f"data.root={empty}")
    assert err.startswith("error: ") and str(empty) in err and "Traceback" not in err

    missing = tmp_path / "vgg16.pth"
    err = fails(config, tmp_path / "run2", capsys, "loss.perceptual_weight=1.0", f"loss.lpips_vgg_path={missing}")
    assert err.startswith("error: ") and str(missing) in err and "loss.perceptual_weight=0" in err


def test_overrides_may_come_before_and_after_options(config: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train_vqgan.main(["--config", str(config), "train.max_steps=1", "--run-dir", str(run), "train.log_every=1"])
    assert load_plain(run / "checkpoints" / "last.pt")["step"] == 1


def stored_channels_last(module: torch.nn.Module) -> bool:
    """Whether the convolution weights whose two layouts differ (more than one input channel and tap) are
    channels_last; contiguous ones give False."""
    weights = [p for p in module.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] * p.shape[3] > 1]
    assert weights
    layouts = {w.is_contiguous(memory_format=torch.channels_last) for w in weights}
    assert len(layouts) == 1
    return layouts.pop()


@pytest.mark.parametrize("compiled", [False, True])
def test_cpu_models_are_channels_last_only_when_compiled(config: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch, compiled: bool) -> None:
    """Compiled CPU convolutions run channels_last, so compiled models are stored that way (no weight
    conversion in every step); eager CPU models stay contiguous."""
    layouts = []

    def record_layout(module: torch.nn.Module) -> torch.nn.Module:
        layouts.append(stored_channels_last(module))
        return module  # the layout is what is checked; tracing is covered by the compiled-step tests

    monkeypatch.setattr(train_vqgan, "compile_module", record_layout)
    built = []
    build_stage1 = train_vqgan.build_stage1
    monkeypatch.setattr(train_vqgan, "build_stage1", lambda cfg: built.append(build_stage1(cfg)) or built[-1])
    train(config, tmp_path / "run", "train.max_steps=1", f"train.compile={str(compiled).lower()}")
    model, disc, _ = built[0]
    assert stored_channels_last(model) == stored_channels_last(disc) == compiled
    assert layouts == ([True, True] if compiled else [])

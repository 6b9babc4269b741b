"""train_transformer.py on a tiny stage-1 checkpoint: artefacts, token cache, resume, wrong checkpoints."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import pytest
import torch
from tiny_training import STAGE1, STAGE2, assert_tensors_equal, load_plain, read_rows, write_config

import generate
import train_transformer
import train_vqgan
from dataloader import build_dataset
from transformer.token_cache import default_cache_folder, tokenize_dataset
from utils.checkpoint import CheckpointError
from utils.config import DataConfig


@pytest.fixture(scope="module")
def stage1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stage-1 checkpoint after two steps of the tiny config."""
    folder = tmp_path_factory.mktemp("stage1")
    config = write_config(folder, "vqgan", STAGE1)
    train_vqgan.main(["--config", str(config), "--run-dir", str(folder / "run"), "train.max_steps=2"])
    return folder / "run" / "checkpoints" / "last.pt"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run in a fresh folder, with an empty token cache in its ``token-cache`` folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VQGAN_TOKEN_CACHE", str(tmp_path / "token-cache"))
    return tmp_path


@pytest.fixture
def config(workdir: Path) -> Path:
    return write_config(workdir, "prior", STAGE2)


def train(config: Path, run_dir: Path, vqgan: Path, *args: str) -> None:
    train_transformer.main(["--config", str(config), "--run-dir", str(run_dir), "--vqgan", str(vqgan), *args])


def fails(config: Path, run_dir: Path, vqgan: Path, capsys: pytest.CaptureFixture, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        train(config, run_dir, vqgan, *args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err
    return err[err.index("error: "):]


def test_tiny_run_writes_artefacts_and_reuses_the_token_cache(config: Path, workdir: Path, stage1: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    run = workdir / "run"
    train(config, run, stage1, "train.sample_every=2", "train.ckpt_every=2")
    rows = read_rows(run / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert {"lr", "loss", "bits_per_token", "items_per_s", "bad_steps"} <= set(rows[0])
    for row in rows:
        assert math.isclose(float(row["bits_per_token"]), float(row["loss"]) / math.log(2), rel_tol=1e-4)
        assert float(row["items_per_s"]) > 0
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_000002.png", "step_000004.png"]
    assert (run / "plots" / "prior.png").is_file()
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"last.pt", "step_000002.pt", "step_000004.pt"}
    state = load_plain(run / "checkpoints" / "last.pt")
    assert state["kind"] == "transformer" and state["step"] == 4 and state["prior_config"]["num_classes"] == 10
    prior, _ = generate.load_prior(str(run / "checkpoints" / "last.pt"), torch.device("cpu"))
    assert prior.class_conditional

    caches = list((workdir / "token-cache").iterdir())
    assert len(caches) == 1
    tokens = torch.load(caches[0], weights_only=True)
    assert tokens["indices"].shape == (64, 64) and int(tokens["num_classes"]) == 10

    def no_tokenising(*args: object, **kwargs: object) -> None:
        raise AssertionError("the dataset was tokenised again instead of read from the cache")

    monkeypatch.setattr(train_transformer, "build_dataset", no_tokenising)
    train(config, workdir / "second", stage1, "train.max_steps=1")
    assert list((workdir / "token-cache").iterdir()) == caches



def test_bf16_training_draws_its_sample_grids(config: Path, workdir: Path, stage1: Path) -> None:
    run = workdir / "run"
    train(config, run, stage1, "train.precision=bf16", "train.sample_every=1", "train.max_steps=1")
    assert [p.name for p in (run / "samples").iterdir()] == ["step_000001.png"]

def test_token_cache_folder_by_flag_and_environment(config: Path, workdir: Path, stage1: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    train(config, workdir / "run", stage1, "train.max_steps=1", "--token-cache", str(workdir / "mine"))
    assert len(list((workdir / "mine").glob("builtin_train_*.pt"))) == 1 and not (workdir / "token-cache").exists()
    monkeypatch.delenv("VQGAN_TOKEN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(workdir / "xdg"))
    assert default_cache_folder() == workdir / "xdg" / "vqgan" / "tokens"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(workdir / "home"))
    assert default_cache_folder() == workdir / "home" / ".cache" / "vqgan" / "tokens"


def test_weight_ema_is_kept_saved_and_used_for_sampling(config: Path, workdir: Path, stage1: Path) -> None:
    run = workdir / "run"
    train(config, run, stage1, "train.ema_decay=0.5", "train.max_steps=3")
    state = load_plain(run / "checkpoints" / "last.pt")
    assert state["ema"].keys() == state["model"].keys()
    assert any(not torch.equal(state["ema"][k], state["model"][k]) for k in state["model"])
    prior, _ = generate.load_prior(str(run / "checkpoints" / "last.pt"), torch.device("cpu"))
    for name, tensor in prior.gpt.state_dict().items():
        assert torch.equal(tensor, state["ema"][name])


def test_cache_key_follows_the_checkpoint_and_the_images(stage1: Path, tmp_path: Path) -> None:
    cache_path = train_transformer.token_cache_name
    data = DataConfig(name="builtin", image_size=16, num_samples=64)
    key = cache_path([stage1], data, "train")
    other = tmp_path / "other.pt"
    state = load_plain(stage1)
    state["model"]["decoder.conv_out.bias"] += 1
    torch.save(state, other)
    assert cache_path([other], data, "train") != key
    assert cache_path([stage1], DataConfig(name="builtin", image_size=16, num_samples=65), "train") != key
    assert cache_path([stage1], data, "test") != key
    same = DataConfig(name="builtin", image_size=16, num_samples=64, num_workers=7)
    assert cache_path([stage1], same, "train") == key


def test_resume_gives_the_weights_of_an_uninterrupted_run(config: Path, workdir: Path, stage1: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    overrides = ["train.lr_schedule=cosine", "train.warmup_steps=1", "train.grad_accum=2"]
    train(config, workdir / "full", stage1, *overrides)
    real = train_transformer.lr_factor

    def lr_factor(step: int, *rest: object) -> float:
        if step == 1:
            signal.raise_signal(signal.SIGTERM)
        return real(step, *rest)

    monkeypatch.setattr(train_transformer, "lr_factor", lr_factor)
    with pytest.raises(SystemExit) as exit_info:
        train(config, workdir / "cut", stage1, *overrides)
    assert exit_info.value.code == 143
    monkeypatch.undo()
    monkeypatch.chdir(workdir)
    capsys.readouterr()
    train(config, workdir / "cut", stage1, "--resume", *overrides)
    assert "resumed at 2" in capsys.readouterr().out
    full = load_plain(workdir / "full" / "checkpoints" / "last.pt")
    resumed = load_plain(workdir / "cut" / "checkpoints" / "last.pt")
    for part in ("model", "optimizer", "step"):
        assert_tensors_equal(full[part], resumed[part], part)
    assert [r["loss"] for r in read_rows(workdir / "full" / "metrics.csv")] == \
        [r["loss"] for r in read_rows(workdir / "cut" / "metrics.csv")]


def test_stage2_checkpoint_given_as_vqgan(config: Path, workdir: Path, stage1: Path,
                                          capsys: pytest.CaptureFixture) -> None:
    train(config, workdir / "run", stage1, "train.max_steps=1")
    err = fails(config, workdir / "other", workdir / "run" / "checkpoints" / "last.pt", capsys)
    assert "is a stage-2 (GPT prior) checkpoint" in err and "stage-1 (VQGAN) checkpoint" in err


def test_stage1_checkpoint_where_stage2_is_expected(config: Path, workdir: Path, stage1: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    err = fails(config, stage1.parent.parent, stage1, capsys, "--resume")
    assert "is a stage-1 (VQGAN) checkpoint" in err and "stage-2 (GPT prior) checkpoint" in err
    with pytest.raises(CheckpointError, match="is a stage-1 .* stage-2"):
        generate.load_prior(str(stage1), torch.device("cpu"))


@pytest.mark.parametrize("content, expected", [
    (b"", "is empty, so it is not a checkpoint"),
    (b"step,loss\n1,0.5\n", "is not a file written by torch.save"),
])
def test_vqgan_argument_that_is_not_a_checkpoint(config: Path, workdir: Path, capsys: pytest.CaptureFixture,
                                                 content: bytes, expected: str) -> None:
    bogus = workdir / "bogus.pt"
    bogus.write_bytes(content)
    err = fails(config, workdir / "run", bogus, capsys)
    assert expected in err and "Check the path" in err


def test_truncated_vqgan_checkpoint(config: Path, workdir: Path, stage1: Path, capsys: pytest.CaptureFixture) -> None:
    data = stage1.read_bytes()
    cut = workdir / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    err = fails(config, workdir / "run", cut, capsys)
    assert "truncated or corrupt" in err and "periodic checkpoint" in err


def test_data_settings_must_match_stage1(config: Path, workdir: Path, stage1: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    err = fails(config, workdir / "run", stage1, capsys, "data.image_size=32")
    assert "data.image_size=32" in err and "trained on 16px images" in err and "data.crop_size" in err
    err = fails(config, workdir / "run", stage1, capsys, "data.channels=1")
    assert "data.channels=1" in err and "trained with data.channels=3" in err


def test_unconditional_data_with_class_conditional_prior(config: Path, workdir: Path, stage1: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    err = fails(config, workdir / "run", stage1, capsys, "data.num_classes=1")
    assert "transformer.condition=none" in err


def test_resume_with_another_vqgan_is_refused(config: Path, workdir: Path, stage1: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    train(config, workdir / "run", stage1, "train.max_steps=1")
    state = load_plain(stage1)
    state["model"]["decoder.conv_out.bias"] += 1
    other = workdir / "other.pt"
    torch.save(state, other)
    err = fails(config, workdir / "run", other, capsys, "--resume", "train.max_steps=1")
    assert "not the stage-1 model this run was started with" in err and "--force" in err


def test_unreadable_token_cache_is_rebuilt(stage1: Path, tmp_path: Path) -> None:
    vqgan, _ = generate.load_vqgan(str(stage1), torch.device("cpu"))
    data = DataConfig(name="builtin", image_size=16, num_samples=8, eval_samples=4, num_workers=0)
    cache = tmp_path / "tokens.pt"
    cache.write_bytes(b"PK\x03\x04 cut short")
    with pytest.warns(UserWarning, match="unreadable.*tokenising again"):
        tokens = tokenize_dataset(vqgan, lambda: (build_dataset(data, "train", augment=False), 10), cache,
                                  torch.device("cpu"))
    assert tokens["indices"].shape == (8, 64)
    assert torch.equal(torch.load(cache, weights_only=True)["indices"], tokens["indices"])

"""generate.py end to end on tiny checkpoints: sample, reconstruct, tokens, visualize, metrics and errors."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_training import STAGE1, STAGE2, write_config

import generate
import train_transformer
import train_vqgan
import utils.run_dir
from dataloader import build_dataset
from dataloader.inputs import data_config_of
from utils.evaluation.class_fidelity import JudgeSettings
from utils.evaluation.metrics import FeatureSet, FeatureStats, fid_from_stats, psnr, ssim
from utils.pictures import plot_metrics_overview, save_images
from vqgan.evaluation import CodebookStats, ReconstructionMetrics

SIZE = 16  # STAGE1 trains on 16x16 RGB images; its test split has 8 of them
TEST_IMAGES = 8


@dataclass
class Checkpoints:
    stage1: Path
    stage1_run: Path
    prior: Path
    unconditional: Path


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    """A 4-step stage-1 run, and a class-conditional and an unconditional 4-step prior on it."""
    folder = tmp_path_factory.mktemp("generate_ckpts")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        train_vqgan.main(["--config", str(write_config(folder, "vqgan", STAGE1)), "--run-dir", "s1",
                          "train.max_steps=4"])
        stage1 = folder / "s1" / "checkpoints" / "last.pt"
        config = str(write_config(folder, "prior", STAGE2))
        train_transformer.main(["--config", config, "--vqgan", str(stage1), "--run-dir", "s2"])
        train_transformer.main(["--config", config, "--vqgan", str(stage1), "--run-dir", "s2u",
                                "transformer.condition=none"])
    return Checkpoints(stage1, folder / "s1", folder / "s2" / "checkpoints" / "last.pt",
                       folder / "s2u" / "checkpoints" / "last.pt")


def run(*args: object) -> None:
    generate.main([str(a) for a in args])


def fails(capsys: pytest.CaptureFixture, *args: object) -> str:
    """Run a command that must stop with exit code 2 and one clean message; return the message."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(*args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: " in err and "Traceback" not in err
    return err[err.index("error: "):]


def pngs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("[0-9]*.png"))


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def grid_size(columns: int, rows: int) -> tuple[int, int]:
    """Size of a ``save_grid`` picture of SIZE-pixel images (2-pixel padding, upscaled to at least 256)."""
    width, height = columns * (SIZE + 2) + 2, rows * (SIZE + 2) + 2
    scale = max(1, math.ceil(256 / max(width, height)))
    return width * scale, height * scale


def reference_reconstructions(stage1: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The test split, its codes and their decoding, computed directly with the model."""
    vqgan, state = generate.load_vqgan(stage1, torch.device("cpu"))
    dataset = build_dataset(data_config_of(state["config"]), "test")
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        indices = vqgan.encode_to_indices(images)
        reconstructions = vqgan.decode_indices(indices).clamp(-1, 1)
    return images, indices, reconstructions


def test_sample_writes_native_size_images_and_a_grid_and_is_seeded(ckpts: Checkpoints, tmp_path: Path) -> None:
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        run("sample", "--checkpoint", ckpts.prior, "--num", 6, "--batch-size", 4, "--seed", seed,
            "--out", tmp_path / name, "--device", "cpu")
    files = pngs(tmp_path / "a")
    assert [p.name for p in files] == [f"{i:06d}.png" for i in range(6)]
    assert all(pixels(p).shape == (SIZE, SIZE, 3) for p in files)
    assert (tmp_path / "a" / "grid.png").is_file()
    assert all(p.read_bytes() == (tmp_path / "b" / p.name).read_bytes() for p in files)
    assert any(not np.array_equal(pixels(p), pixels(tmp_path / "c" / p.name)) for p in files)


def test_sample_labels_cycle_and_settings_default_to_the_checkpoint(ckpts: Checkpoints) -> None:
    prior, state = generate.load_prior(ckpts.prior, torch.device("cpu"))
    def labels(classes: list[int] | None, start: int, count: int) -> list[int]:
        return generate.sample_labels(generate.class_cycle(prior, classes), start, count).tolist()

    assert labels(None, 0, 12) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert labels(None, 10**12, 3) == [0, 1, 2]  # any sample's class, without a tensor of every sample's
    assert labels([3], 0, 3) == [3, 3, 3]
    assert labels([1, 7], 0, 5) == [1, 7, 1, 7, 1] and labels([1, 7], 3, 2) == [7, 1]

    def settings(**given: float | None) -> dict:
        flags = {"temperature": None, "top_k": None, "top_p": None, "cfg_scale": None, "compile": None,
                 "window_caches": None, **given}
        return generate.sampling_settings(prior, state, argparse.Namespace(**flags))

    assert settings() == {"temperature": 1.0, "top_k": STAGE2["sample"]["top_k"], "top_p": None, "cfg_scale": 1.0,
                          "compile": False, "window_caches": 64}
    assert settings(top_k=0, temperature=0.5, cfg_scale=2.0, compile=True, window_caches=0) == {
        "temperature": 0.5, "top_k": None, "top_p": None, "cfg_scale": 2.0, "compile": True, "window_caches": 0}
    unconditional, state = generate.load_prior(ckpts.unconditional, torch.device("cpu"))
    assert generate.sample_labels(generate.class_cycle(unconditional, None), 0, 4) is None
    with pytest.raises(generate.UsageError, match="cfg-scale"):
        generate.sampling_settings(unconditional, state, argparse.Namespace(cfg_scale=2.0))
    with pytest.raises(generate.UsageError, match="--cfg-scale must be 0 or more"):
        settings(cfg_scale=-1.0)


def test_reconstruct_writes_pairs_and_metrics_that_match_utils_metrics(ckpts: Checkpoints, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "rec"
    run("reconstruct", "--checkpoint", ckpts.stage1, "--input", "test", "--out", out, "--batch-size", 3)
    assert "psnr" in capsys.readouterr().out
    files = pngs(out)
    assert len(files) == TEST_IMAGES
    assert all(pixels(p).shape == (SIZE, 2 * SIZE, 3) for p in files)
    assert (out / "grid.png").is_file()

    metrics = json.loads((out / "metrics.json").read_text())
    images, indices, reconstructions = reference_reconstructions(ckpts.stage1)
    codes = CodebookStats(16)
    codes.update(indices)
    assert metrics["n_images"] == TEST_IMAGES and metrics["codebook_size"] == 16
    assert metrics["psnr"] == pytest.approx(float(psnr(reconstructions, images)), rel=1e-5)
    assert metrics["ssim"] == pytest.approx(float(ssim(reconstructions, images)), rel=1e-5, abs=1e-6)
    assert metrics["codebook_usage"] == pytest.approx(codes.usage)
    assert metrics["perplexity"] == pytest.approx(codes.perplexity)
    assert 0 < metrics["psnr"] < 60 and -1 <= metrics["ssim"] <= 1
    assert 0 < metrics["codebook_usage"] <= 1 and 1 <= metrics["perplexity"] <= 16
    first = pixels(files[0])
    expected = torch.cat([images[:1], reconstructions[:1]], dim=-1)
    assert np.array_equal(first, ((expected[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())


def test_reconstruction_metrics_on_known_images() -> None:
    images = torch.rand(6, 3, 16, 16) * 1.6 - 0.8
    shifted = images + 0.1  # 0.05 on [0, 1] pixels: PSNR = -10 log10(0.05^2)
    indices = torch.tensor([0, 0, 1, 1]).repeat(6, 1).view(6, 2, 2)
    whole = ReconstructionMetrics(codebook_size=4)
    whole.update(images, shifted, indices)
    split = ReconstructionMetrics(codebook_size=4)
    for part in range(3):
        split.update(images[2 * part:2 * part + 2], shifted[2 * part:2 * part + 2], indices[2 * part:2 * part + 2])
    result = whole.result()
    assert result["psnr"] == pytest.approx(-10 * math.log10(0.05**2), rel=1e-4)
    assert result["codebook_usage"] == 0.5 and result["perplexity"] == pytest.approx(2.0)
    assert split.result() == pytest.approx(result)
    identical = ReconstructionMetrics(codebook_size=4)
    identical.update(images, images.clone(), indices)
    assert identical.result()["ssim"] == pytest.approx(1.0) and identical.result()["psnr"] == math.inf


def test_feature_set_fid_equals_the_statistics_route() -> None:
    generator = torch.Generator().manual_seed(0)
    for count in (5, 40):  # fewer vectors than dimensions (exact small route), and more (statistics)
        a, b = FeatureSet(), FeatureSet()
        stats_a, stats_b = FeatureStats(16), FeatureStats(16)
        for _ in range(2):
            x, y = torch.randn(count, 16, generator=generator), torch.randn(count, 16, generator=generator) + 0.3
            a.update(x), b.update(y), stats_a.update(x), stats_b.update(y)
        assert (a.rows is not None) == (2 * count < 16)
        assert a.fid(b) == pytest.approx(fid_from_stats(stats_a, stats_b), rel=1e-6)


def test_reconstruct_a_folder_or_a_config_resizes_to_the_model(ckpts: Checkpoints, tmp_path: Path) -> None:
    folder = tmp_path / "images" / "nested"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((20, 24), 40 * i, np.uint8), mode="L").save(folder / f"{i}.png")
    run("reconstruct", "--checkpoint", ckpts.stage1, "--input", tmp_path / "images", "--out", tmp_path / "r",
        "--num", 2)
    files = pngs(tmp_path / "r")
    assert len(files) == 2 and all(pixels(p).shape == (SIZE, 2 * SIZE, 3) for p in files)
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["n_images"] == 2

    data = {"name": "builtin", "image_size": 32, "channels": 1, "eval_samples": 3, "num_workers": 0}
    config = write_config(tmp_path, "other_data", {"data": data, "train": {"max_steps": 1}})
    run("reconstruct", "--checkpoint", ckpts.stage1, "--input", config, "--out", tmp_path / "c")
    files = pngs(tmp_path / "c")  # the config's test split, at the model's 16x16 RGB
    assert len(files) == 3 and all(pixels(p).shape == (SIZE, 2 * SIZE, 3) for p in files)


def test_tokens_round_trip_gives_the_reconstructions(ckpts: Checkpoints, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    run("reconstruct", "--checkpoint", ckpts.stage1, "--input", "test", "--out", tmp_path / "rec")
    run("tokens", "--checkpoint", ckpts.stage1, "--input", "test", "--out", tmp_path / "tokens.npy")
    tokens = np.load(tmp_path / "tokens.npy")
    _, indices, _ = reference_reconstructions(ckpts.stage1)
    assert tokens.dtype == np.int32 and np.array_equal(tokens, indices.numpy())
    labels = np.load(tmp_path / "tokens.labels.npy")
    assert labels.tolist() == [i % 10 for i in range(TEST_IMAGES)]  # builtin item i has class i % 10

    run("tokens", "--decode", "--checkpoint", ckpts.stage1, "--input", tmp_path / "tokens.npy", "--out",
        tmp_path / "dec")
    decoded = pngs(tmp_path / "dec")
    assert len(decoded) == TEST_IMAGES and (tmp_path / "dec" / "grid.png").is_file()
    for path in decoded:
        assert np.array_equal(pixels(path), pixels(tmp_path / "rec" / path.name)[:, SIZE:])

    np.save(tmp_path / "bad.npy", tokens + 16)
    err = fails(capsys, "tokens", "--decode", "--checkpoint", ckpts.stage1, "--input", tmp_path / "bad.npy",
                "--out", tmp_path / "x")
    assert "16 codes" in err


def test_visualize_draws_every_picture(ckpts: Checkpoints, tmp_path: Path) -> None:
    run("visualize", "--checkpoint", ckpts.prior, "--out", tmp_path / "v2", "--run-dir", ckpts.stage1_run,
        "--per-class", 3, "--num", 6)
    names = {"reconstructions.png", "codebook_usage.png", "token_maps.png", "samples_by_class.png",
             "training_curves.png"}
    assert {p.name for p in (tmp_path / "v2").iterdir()} == names
    with Image.open(tmp_path / "v2" / "samples_by_class.png") as grid:
        assert grid.size == grid_size(columns=3, rows=10)  # one row per class
    with Image.open(tmp_path / "v2" / "reconstructions.png") as grid:
        assert grid.size == grid_size(columns=6, rows=2)  # 6 images above their reconstructions
    for name in ("codebook_usage.png", "token_maps.png", "training_curves.png"):
        with Image.open(tmp_path / "v2" / name) as picture:
            assert min(picture.size) >= 200

    run("visualize", "--checkpoint", ckpts.unconditional, "--out", tmp_path / "vu", "--per-class", 2, "--num", 4)
    assert "samples.png" in {p.name for p in (tmp_path / "vu").iterdir()}
    run("visualize", "--checkpoint", ckpts.stage1, "--out", tmp_path / "v1", "--num", 4)
    assert {p.name for p in (tmp_path / "v1").iterdir()} == {"reconstructions.png", "codebook_usage.png",
                                                               "token_maps.png"}


@pytest.mark.parametrize("case", ["stage1_for_sample", "stage2_for_reconstruct", "stage2_for_tokens",
                                  "class_out_of_range", "class_to_unconditional", "cfg_on_unconditional",
                                  "missing_folder", "missing_inception", "missing_lpips", "missing_run_dir"])
def test_clean_errors(case: str, ckpts: Checkpoints, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    commands = {
        "stage1_for_sample": (["sample", "--checkpoint", ckpts.stage1], "stage-1 (VQGAN) checkpoint"),
        "stage2_for_reconstruct": (["reconstruct", "--checkpoint", ckpts.prior, "--input", "test"],
                                   "stage-2 (GPT prior) checkpoint"),
        "stage2_for_tokens": (["tokens", "--checkpoint", ckpts.prior, "--input", "test"], "stage-1 (VQGAN)"),
        "class_out_of_range": (["sample", "--checkpoint", ckpts.prior, "--class", 3, 10], "class id 10 is out"),
        "class_to_unconditional": (["sample", "--checkpoint", ckpts.unconditional, "--class", 1], "unconditional"),
        "cfg_on_unconditional": (["sample", "--checkpoint", ckpts.unconditional, "--cfg-scale", 2],
                                 "needs a conditional prior"),
        "missing_folder": (["reconstruct", "--checkpoint", ckpts.stage1, "--input", tmp_path / "nope"],
                           "does not exist"),
        "missing_inception": (["reconstruct", "--checkpoint", ckpts.stage1, "--input", "test", "--fid",
                               "--inception", tmp_path / "none.pt"], "Inception weights not found"),
        "missing_lpips": (["reconstruct", "--checkpoint", ckpts.stage1, "--input", "test", "--lpips",
                           "--lpips-vgg", tmp_path / "none.pth"], "--lpips-vgg"),
        "missing_run_dir": (["visualize", "--checkpoint", ckpts.stage1, "--run-dir", tmp_path], "metrics.csv"),
    }
    args, expected = commands[case]
    assert expected in fails(capsys, *args, "--out", out)
    assert not out.exists() or not pngs(out)


@pytest.mark.parametrize("flags, expected", [
    (["--cfg-scale", "nan"], "argument --cfg-scale: expected a finite number"),
    (["--temperature", "inf"], "argument --temperature: expected a finite number"),
    (["--seed", "99999999999999999999999"], "argument --seed: expected an integer within"),
    (["--num", "99999999999999999999999"], "argument --num: expected an integer within"),
    (["--top-p", "0"], "argument --top-p: must be above 0 and at most 1"),
    (["--num", "2", "--num", "3"], "--num was given twice"),
])
def test_command_line_numbers_are_checked_before_any_work(flags: list[str], expected: str, ckpts: Checkpoints,
                                                          tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert expected in fails(capsys, "sample", "--checkpoint", ckpts.prior, "--out", tmp_path / "out", *flags)
    assert not (tmp_path / "out").exists()


def test_unwritable_output_is_reported_before_sampling(ckpts: Checkpoints, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    sampled = []
    monkeypatch.setattr(utils.run_dir.tempfile, "NamedTemporaryFile", refused)  # root may write anywhere: simulate
    monkeypatch.setattr(generate.VQGANPrior, "sample", lambda *a, **k: sampled.append(1))
    err = fails(capsys, "sample", "--checkpoint", ckpts.prior, "--out", tmp_path / "out", "--num", 2)
    assert f"cannot write to '{tmp_path / 'out'}' (Permission denied)" in err and not sampled


def test_checkpoint_without_its_config_is_named(ckpts: Checkpoints, tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    state = torch.load(ckpts.stage1, weights_only=True)
    del state["config"]
    torch.save(state, tmp_path / "no_config.pt")
    err = fails(capsys, "reconstruct", "--checkpoint", tmp_path / "no_config.pt", "--input", "test", "--out",
                tmp_path / "out")
    assert "no_config.pt' is a stage-1 (VQGAN) checkpoint" in err and "incomplete: 'config' (missing)" in err


def test_malformed_metrics_csv_is_reported_before_any_picture(ckpts: Checkpoints, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.csv").write_text("step,rec_loss\n1,0.5\n2,oops\n")
    err = fails(capsys, "visualize", "--checkpoint", ckpts.stage1, "--run-dir", run_dir, "--out", tmp_path / "out",
                "--num", 2)
    assert "metrics.csv', line 3, column 'rec_loss': 'oops' is not a number" in err
    assert not list((tmp_path / "out").glob("*.png"))


def test_lpips_with_weight_files(ckpts: Checkpoints, tmp_path: Path, lpips_files) -> None:
    run("reconstruct", "--checkpoint", ckpts.stage1, "--input", "test", "--num", 2, "--out", tmp_path,
        "--lpips", "--lpips-vgg", lpips_files.vgg, "--lpips-heads", lpips_files.heads)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["lpips"] > 0 and math.isfinite(metrics["lpips"])


def test_fid_with_the_real_inception_network(ckpts: Checkpoints, tmp_path: Path) -> None:
    run("reconstruct", "--checkpoint", ckpts.stage1, "--input", "test", "--num", 4, "--fid", "--out", tmp_path / "r")
    rfid = json.loads((tmp_path / "r" / "metrics.json").read_text())["rfid"]
    assert 0 < rfid < 1e4  # a 4-step model reconstructs badly, but the distance is finite and positive
    run("sample", "--checkpoint", ckpts.prior, "--num", 4, "--fid-ref", "test", "--out", tmp_path / "s")
    metrics = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert metrics["n_samples"] == 4 and metrics["n_reference"] == TEST_IMAGES
    assert 0 < metrics["fid"] < 1e4


def test_save_images_and_metrics_overview(tmp_path: Path) -> None:
    paths = save_images(torch.zeros(2, 1, 5, 7), tmp_path, start=3)
    assert [p.name for p in paths] == ["000003.png", "000004.png"]
    with Image.open(paths[0]) as image:
        assert image.mode == "L" and image.size == (7, 5)
    csv = tmp_path / "metrics.csv"
    csv.write_text("step,loss,p_loss,lr\n1,2.0,,0.1\n2,1.5,,0.1\n")
    assert plot_metrics_overview(csv, tmp_path / "curves.png") == ["loss", "lr"]
    assert (tmp_path / "curves.png").is_file()


def test_sample_reports_class_fidelity_and_caches_the_judge(ckpts: Checkpoints, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generate, "JudgeSettings", lambda: JudgeSettings(width=4, steps=4, batch_size=16))
    cache = tmp_path / "cache"
    for out in ("a", "b"):
        run("sample", "--checkpoint", ckpts.prior, "--num", 10, "--batch-size", 4, "--class-fidelity",
            "--token-cache", cache, "--out", tmp_path / out)
    assert len(list(cache.glob("judge_builtin_*.pt"))) == 1
    first, second = (json.loads((tmp_path / out / "metrics.json").read_text()) for out in ("a", "b"))
    assert first == second
    assert first["n_samples"] == 10 and 0 <= first["class_fidelity"] <= 1 and 0 <= first["near_copy_rate"] <= 1
    assert set(first["per_class_fidelity"]) == {str(c) for c in range(10)}
    assert 0 <= first["judge_reconstruction_accuracy"] <= 1
    assert "fid" not in first


@pytest.mark.parametrize("case", ["unconditional", "size"])
def test_class_fidelity_refusals(case: str, ckpts: Checkpoints, tmp_path: Path,
                                 capsys: pytest.CaptureFixture) -> None:
    args, expected = {
        "unconditional": (["--checkpoint", ckpts.unconditional], "needs a class-conditional prior"),
        "size": (["--checkpoint", ckpts.prior, "--size", 32], "leave out --size"),
    }[case]
    assert expected in fails(capsys, "sample", *args, "--class-fidelity", "--token-cache", tmp_path / "cache",
                             "--out", tmp_path / "out")
    assert not (tmp_path / "cache").exists()

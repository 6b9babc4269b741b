"""Importing taming-transformers VQGAN checkpoints: parity with taming's own modules, safe reading, errors, use.

The fixture in test/fixtures was written by make_taming_fixture.py from taming's modules (the
reference package is not needed here): a tiny VQModel-layout checkpoint saved as Lightning saves
one, and taming's outputs on an input batch.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fixtures.pattern_weights import pattern_weights
from tiny_training import STAGE2, script_fails, write_config

import generate
import train_transformer
import train_vqgan
from dataloader import build_dataset
from dataloader.inputs import data_config_of
from transformer.config import Stage2Config
from utils.checkpoint import load_checkpoint
from utils.config import ConfigError, from_dict, load_config
from utils.taming_files import NotLoaded, read_taming_checkpoint
from vqgan import LPIPS, Discriminator, DiscriminatorConfig
from vqgan.config import Stage1Config
from vqgan.taming import convert_taming_state_dict

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CKPT = FIXTURES / "taming_tiny.ckpt"
CONFIG = FIXTURES / "taming_tiny.yaml"
CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RESOLUTION = 32
VGG_PREFIX = "loss.perceptual_loss.net."
TOLERANCE = 1e-5
# The tiny fixture model as a config of this repository (what import-taming should infer).
TINY_STAGE1 = {
    "data": {"name": "builtin", "image_size": RESOLUTION, "channels": 3, "num_samples": 32, "eval_samples": 4,
             "num_workers": 0},
    "model": {"ch": 32, "ch_mult": [1, 1], "num_res_blocks": 1, "attn_resolutions": [16], "z_channels": 16,
              "embed_dim": 8, "codebook_size": 64},
    "disc": {"ndf": 16, "n_layers": 2},
    "loss": {"disc_start": 100},
    "train": {"batch_size": 4, "max_steps": 1, "log_every": 1, "sample_every": 0, "ckpt_every": 0,
              "num_sample_images": 2, "device": "cpu"},
}


@pytest.fixture(scope="module")
def expected() -> dict:
    return torch.load(FIXTURES / "taming_tiny_expected.pt", map_location="cpu", weights_only=True)


def run(*args: object) -> None:
    generate.main([str(a) for a in args])


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The committed fixture through the real command."""
    out = tmp_path_factory.mktemp("converted") / "tiny.pt"
    run("import-taming", "--checkpoint", CKPT, "--out", out, "--resolution", RESOLUTION, "--config", CONFIG)
    return out


@pytest.fixture(scope="module")
def with_vgg(tmp_path_factory: pytest.TempPathFactory, expected: dict) -> Path:
    """The fixture with the LPIPS VGG16 it leaves out put back (same names, pattern weights), converted."""
    folder = tmp_path_factory.mktemp("with_vgg")
    weights, _ = read_taming_checkpoint(CKPT)
    shapes = {key.removeprefix(VGG_PREFIX): shape for key, shape in expected["lpips_vgg_shapes"].items()}
    weights.update({VGG_PREFIX + key: value for key, value in pattern_weights(shapes).items()})
    torch.save({"state_dict": weights, "global_step": 5}, folder / "last.ckpt")
    run("import-taming", "--checkpoint", folder / "last.ckpt", "--out", folder / "tiny.pt", "--resolution", RESOLUTION)
    return folder / "tiny.pt"


def test_converted_model_computes_what_taming_computes(converted: Path, expected: dict,
                                                       capsys: pytest.CaptureFixture) -> None:
    vqgan, state = generate.load_vqgan(str(converted), torch.device("cpu"))
    images = expected["images"]
    with torch.no_grad():
        out = vqgan(images)
        indices = vqgan.encode_to_indices(images)
        decoded = vqgan.decode_indices(indices)
    assert torch.equal(indices, expected["indices"]) and torch.equal(out.indices, expected["indices"])
    assert (out.reconstruction - expected["reconstructions"]).abs().max() < TOLERANCE
    assert (decoded - expected["reconstructions"]).abs().max() < TOLERANCE

    full = load_checkpoint(converted, kind="vqgan")
    disc = Discriminator(3, DiscriminatorConfig(**full["config"]["disc"]))
    disc.load_state_dict(full["disc"])
    with torch.no_grad():
        logits = disc.eval()(images)
    assert (logits - expected["disc_logits"]).abs().max() < TOLERANCE

    cfg = from_dict(Stage1Config, full["config"])  # the stored config is complete and valid
    assert cfg.validate() == [] and cfg.data.image_size == RESOLUTION and cfg.data.channels == 3
    for key, value in TINY_STAGE1["model"].items():
        assert list(getattr(cfg.model, key)) == value if isinstance(value, list) else getattr(cfg.model, key) == value
    assert (cfg.disc.ndf, cfg.disc.n_layers, cfg.loss.disc_weight) == (16, 2, 0.75)  # disc_weight from the yaml
    assert full["step"] == 1234 and full["imported_from"]["epoch"] == 3
    assert "pytorch_lightning" not in sys.modules  # its pickled hyper-parameters were never imported


def test_lpips_weights_are_exported_in_the_formats_lpips_reads(with_vgg: Path, expected: dict) -> None:
    vgg = with_vgg.with_name("tiny.lpips_vgg.pth")
    heads = with_vgg.with_name("tiny.lpips_heads.pth")
    lpips = LPIPS(vgg_weights=vgg, heads_weights=heads, download=False)
    with torch.no_grad():
        distance = lpips(expected["images"], expected["reconstructions"])
    assert torch.allclose(distance, expected["lpips"], rtol=1e-5, atol=1e-6)
    config = load_checkpoint(with_vgg)["config"]["loss"]
    assert (config["lpips_vgg_path"], config["lpips_heads_path"]) == (str(vgg), str(heads))


def test_restricted_reader_runs_no_pickled_code(tmp_path: Path) -> None:
    weights, info = read_taming_checkpoint(CKPT)
    assert info == {"epoch": 3, "global_step": 1234} and "encoder.conv_in.weight" in weights
    assert "pytorch_lightning" not in sys.modules

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"state_dict": {"encoder.conv_in.weight": torch.ones(2)}, "hyper_parameters": Payload()},
               tmp_path / "evil.ckpt")
    weights, _ = read_taming_checkpoint(tmp_path / "evil.ckpt")
    assert torch.equal(weights["encoder.conv_in.weight"], torch.ones(2)) and not marker.exists()

    from utils.taming_files import load_restricted
    stand_in = load_restricted(tmp_path / "evil.ckpt")["hyper_parameters"]
    assert isinstance(stand_in, NotLoaded) and stand_in.origin.endswith(".system")


def test_full_size_imagenet_f16_maps_onto_the_shipped_configs(expected: dict) -> None:
    """Zeros in the shapes of taming's vqgan_imagenet_f16_16384 convert to exactly configs/imagenet_f16_16384.yaml."""
    state = {key: torch.zeros(shape) for key, shape in expected["f16_16384_shapes"].items()
             if not key.startswith(VGG_PREFIX)}
    conversion = convert_taming_state_dict(state, resolution=256)
    del state
    cfg = load_config(Stage1Config, CONFIGS / "imagenet_f16_16384.yaml")
    model = dataclasses.asdict(cfg.model)
    assert {key: conversion.model_args[key] for key in model} == model
    assert conversion.model_args["resolution"] == cfg.data.image_size
    assert conversion.disc_args == {"in_channels": 3, **dataclasses.asdict(cfg.disc)}
    assert conversion.lpips_heads is not None and conversion.lpips_vgg is None
    other = load_config(Stage1Config, CONFIGS / "imagenet_f16_1024.yaml")
    assert dataclasses.replace(other.model, codebook_size=16384) == cfg.model


def test_the_converted_checkpoint_works_in_generate(converted: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    data = write_config(tmp_path, "data", {"data": TINY_STAGE1["data"]})
    run("reconstruct", "--checkpoint", converted, "--input", data, "--out", tmp_path / "rec", "--device", "cpu")
    assert "psnr" in capsys.readouterr().out and (tmp_path / "rec" / "grid.png").is_file()
    run("tokens", "--checkpoint", converted, "--input", data, "--out", tmp_path / "tokens.npy", "--device", "cpu")
    tokens = np.load(tmp_path / "tokens.npy")
    vqgan, state = generate.load_vqgan(str(converted), torch.device("cpu"))
    dataset = build_dataset(data_config_of({"data": TINY_STAGE1["data"]}), "test")
    with torch.no_grad():
        direct = vqgan.encode_to_indices(torch.stack([dataset[i][0] for i in range(len(dataset))]))
    assert np.array_equal(tokens, direct.numpy())
    run("tokens", "--decode", "--checkpoint", converted, "--input", tmp_path / "tokens.npy", "--out",
        tmp_path / "decoded", "--device", "cpu")
    assert len(list((tmp_path / "decoded").glob("0*.png"))) == len(dataset)
    run("visualize", "--checkpoint", converted, "--input", data, "--out", tmp_path / "pictures", "--device", "cpu")
    assert list((tmp_path / "pictures").glob("*.png"))


def test_fine_tuning_starts_from_the_converted_weights(with_vgg: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    lpips = [f"loss.lpips_vgg_path={with_vgg.with_name('tiny.lpips_vgg.pth')}",
             f"loss.lpips_heads_path={with_vgg.with_name('tiny.lpips_heads.pth')}"]
    config = write_config(tmp_path, "tune", TINY_STAGE1)
    train_vqgan.main(["--config", str(config), "--run-dir", str(tmp_path / "run"), f"train.init_from={with_vgg}",
                      "train.lr=1e-12", *lpips])
    assert f"initialised from {with_vgg}" in capsys.readouterr().out
    tuned = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    start = load_checkpoint(with_vgg)
    assert tuned["step"] == 1 and tuned["opt_ae"]["state"]  # a new run: step 1, its own optimizer
    for key, value in start["model"].items():
        if value.is_floating_point():
            assert torch.allclose(tuned["model"][key], value, atol=1e-6), key  # one step of lr 1e-12
    assert all(torch.equal(tuned["disc"][key], value) for key, value in start["disc"].items())  # GAN not started

    err = script_fails(capsys, train_vqgan.main, *["--config", config, "--run-dir", tmp_path / "bad",
                                           f"train.init_from={with_vgg}", "model.codebook_size=32", "disc.n_layers=3",
                                           *lpips])
    assert "train.init_from" in err and "model.codebook_size: 64 -> 32" in err and "disc.n_layers: 2 -> 3" in err


def test_the_converted_checkpoint_trains_a_prior(converted: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, "prior", {**STAGE2, "data": TINY_STAGE1["data"],
                                              "train": {**STAGE2["train"], "max_steps": 2}})
    train_transformer.main(["--config", str(config), "--vqgan", str(converted), "--run-dir", "prior"])
    state = load_checkpoint(tmp_path / "prior" / "checkpoints" / "last.pt", kind="transformer")
    assert state["step"] == 2 and state["vqgan_config"]["codebook_size"] == 64


def test_init_from_is_refused_in_stage2_configs() -> None:
    with pytest.raises(ConfigError, match="unknown config key 'train.init_from'"):
        load_config(Stage2Config, None, ["train.init_from=x.pt"])


def _bad_input(kind: str, folder: Path, converted: Path, expected: dict) -> tuple[list[object], list[str]]:
    """Arguments for import-taming and the phrases its error must contain."""
    checkpoint = folder / "input.ckpt"
    extra: list[object] = []
    if kind == "not a checkpoint":
        checkpoint.write_text("model:\n  params: {}\n")
        phrases = ["is not a file written by torch.save", "taming-transformers README"]
    elif kind == "no state_dict":
        torch.save({"weights": [1, 2, 3]}, checkpoint)
        phrases = ["not a taming-transformers checkpoint", "no 'state_dict'"]
    elif kind == "truncated":
        data = CKPT.read_bytes()
        checkpoint.write_bytes(data[:len(data) // 2])
        phrases = ["truncated or corrupt", "Download it again"]
    elif kind == "this repository's checkpoint":
        checkpoint = converted
        phrases = ["checkpoint of this repository", "needs no import"]
    elif kind == "config mismatch":
        config = yaml.safe_load(CONFIG.read_text())
        config["model"]["params"]["n_embed"] = 128
        config["model"]["params"]["ddconfig"]["attn_resolutions"] = [32]
        (folder / "model.yaml").write_text(yaml.safe_dump(config))
        checkpoint, extra = CKPT, ["--config", folder / "model.yaml"]
        phrases = ["does not match the config", "n_embed: config 128, tensors 64",
                   "attn_resolutions: config [32], tensors [16]", "model.yaml"]
    elif kind == "config of another quantizer":
        config = yaml.safe_load(CONFIG.read_text())
        config["model"]["target"] = "taming.models.vqgan.GumbelVQ"
        (folder / "model.yaml").write_text(yaml.safe_dump(config))
        checkpoint, extra = CKPT, ["--config", folder / "model.yaml"]
        phrases = ["described by its config as taming.models.vqgan.GumbelVQ", "nearest-code quantizer"]
    elif kind == "mis-shaped gumbel quantizer":
        names = set(expected["gumbel_quantize_shapes"])
        assert names == {"quantize.proj.weight", "quantize.proj.bias", "quantize.embed.weight"}
        weights, _ = read_taming_checkpoint(CKPT)
        del weights["quantize.embedding.weight"]
        # proj takes z_channels (16) inputs, but quant_conv gives embed_dim (8): taming's GumbelVQ could not run it
        tiny = {"quantize.proj.weight": (64, 16, 1, 1), "quantize.proj.bias": (64,), "quantize.embed.weight": (64, 8)}
        weights.update({name: torch.zeros(shape) for name, shape in tiny.items()})
        torch.save({"state_dict": weights}, checkpoint)
        phrases = ["Gumbel projection quantize.proj of shape (64, 16, 1, 1)", "needs (64, 8, 1, 1)"]
    else:
        raise AssertionError(kind)
    return ["--checkpoint", checkpoint, *extra], phrases + [str(checkpoint)]


@pytest.mark.parametrize("kind", ["not a checkpoint", "no state_dict", "truncated", "this repository's checkpoint",
                                  "config mismatch", "config of another quantizer", "mis-shaped gumbel quantizer"])
def test_bad_inputs_are_refused_and_nothing_is_written(kind: str, converted: Path, expected: dict, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    args, phrases = _bad_input(kind, tmp_path, converted, expected)
    out = tmp_path / "out" / "converted.pt"
    err = script_fails(capsys, generate.main, "import-taming", *args, "--out", out, "--resolution", RESOLUTION)
    for phrase in phrases:
        assert phrase in err, f"{phrase!r} not in {err!r}"
    assert not out.parent.exists()


def test_existing_output_is_kept_unless_forced(converted: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "tiny.pt"
    out.write_bytes(b"keep")
    err = script_fails(capsys, generate.main, "import-taming", "--checkpoint", CKPT, "--out", out, "--resolution", 32)
    assert "already exist" in err and "--force" in err and out.read_bytes() == b"keep"
    run("import-taming", "--checkpoint", CKPT, "--out", out, "--resolution", RESOLUTION, "--force")
    assert load_checkpoint(out, kind="vqgan")["model_config"]["codebook_size"] == 64

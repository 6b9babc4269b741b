"""Importing taming-transformers transformers (``Net2NetTransformer``) and Gumbel VQGANs: parity with taming's own
modules, the converted checkpoints in generate.py, and refusals.

The fixtures in test/fixtures were written by make_taming_stage2_fixture.py from taming's modules (the reference
package is not needed here): tiny checkpoints saved as Lightning saves them, without their encoders' and decoders'
tensors, which both sides fill with pattern weights, and taming's outputs.
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fixtures.pattern_weights import pattern_weights
from PIL import Image
from tiny_training import script_fails, write_config

import generate
import train_vqgan
from transformer.config import Stage2Config
from utils.checkpoint import load_checkpoint
from utils.config import ConfigError, from_dict, load_config
from utils.taming_files import read_taming_checkpoint
from vqgan import VQGAN, VQGANConfig
from vqgan.config import Stage1Config

FIXTURES = Path(__file__).resolve().parent / "fixtures"
KINDS = ("segmentation", "class", "none", "coord", "depth")
CODES = 32
RESOLUTION = 8
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def expected() -> dict:
    return torch.load(FIXTURES / "taming_stage2_expected.pt", map_location="cpu", weights_only=True)


def complete_checkpoint(name: str, left_out: torch.Tensor, folder: Path) -> Path:
    """The committed fixture ``name`` with its left-out tensors (``left_out``: their names and shapes as
    zlib-compressed JSON) put back as pattern weights, as a full checkpoint."""
    weights, info = read_taming_checkpoint(FIXTURES / f"{name}.ckpt")
    assert "pytorch_lightning" not in sys.modules  # its pickled hyper-parameters were never imported
    weights.update(pattern_weights(json.loads(zlib.decompress(left_out.numpy().tobytes()))))
    torch.save({"state_dict": weights, **info}, folder / f"{name}.ckpt")
    return folder / f"{name}.ckpt"


def run(*args: object) -> None:
    generate.main([str(a) for a in args])


@pytest.fixture(scope="module")
def taming_files(tmp_path_factory: pytest.TempPathFactory, expected: dict) -> dict[str, Path]:
    """The complete taming checkpoints, by kind."""
    folder = tmp_path_factory.mktemp("taming")
    names = {kind: f"taming_stage2_{kind}" for kind in KINDS} | {"gumbel": "taming_gumbel"}
    return {kind: complete_checkpoint(name, expected[kind]["left_out"], folder) for kind, name in names.items()}


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, taming_files: dict[str, Path]) -> dict[str, Path]:
    """Every fixture through the real command."""
    folder = tmp_path_factory.mktemp("converted")
    for kind, path in taming_files.items():
        config = FIXTURES / f"taming_{'gumbel' if kind == 'gumbel' else 'stage2_' + kind}.yaml"
        run("import-taming", "--checkpoint", path, "--out", folder / f"{kind}.pt", "--config", config)
    return {kind: folder / f"{kind}.pt" for kind in taming_files}


def our_condition(kind: str, entry: dict) -> torch.Tensor | None:
    """What this package's prior takes for the fixture's condition (label maps, class ids, coordinates)."""
    return None if kind == "none" else entry["condition"]  # label maps are one-hot only for taming


@pytest.mark.parametrize("kind", KINDS)
def test_converted_prior_computes_taming_logits(kind: str, converted: dict[str, Path], expected: dict) -> None:
    prior, state = generate.load_prior(str(converted[kind]), torch.device("cpu"))
    entry = expected[kind]
    codes = entry["codes"]
    assert torch.equal(prior.encode(expected["images"]), codes)
    cond_tokens = prior.condition_tokens(our_condition(kind, entry), len(codes))
    if kind != "none":
        assert torch.equal(cond_tokens, entry["cond_tokens"])
    inputs, _ = prior.make_inputs(codes, cond_tokens)
    with torch.no_grad():
        logits = prior.gpt(inputs)[0][:, prior.prefix_len - 1:]
    assert logits.shape == (len(codes), 16, CODES)
    assert (logits - entry["logits"][..., :CODES]).abs().max() < TOLERANCE
    assert state["prior_config"]["condition_dropout"] == 0.0 and state["prior_config"]["pkeep"] == 0.9
    assert from_dict(Stage2Config, state["config"]).validate() == []


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_samples_are_taming_greedy_samples(kind: str, converted: dict[str, Path], expected: dict) -> None:
    prior, _ = generate.load_prior(str(converted[kind]), torch.device("cpu"))
    entry = expected[kind]
    condition = our_condition(kind, entry)
    sampled, _ = prior.sample(len(entry["codes"]), condition, top_k=1)
    assert torch.equal(sampled.flatten(1), entry["greedy"])
    half = entry["codes"][:, :8]
    completed, _ = prior.sample(len(half), condition, given=half, top_k=1)
    assert torch.equal(completed.flatten(1), entry["completed"])


def test_token_table_layout(converted: dict[str, Path], taming_files: dict[str, Path]) -> None:
    """Codes keep taming's rows, condition token t is row K + t, the null row is sos_token's or the mean."""
    for kind, sos in (("none", 3), ("class", None)):
        taming, _ = read_taming_checkpoint(taming_files[kind])
        theirs = taming["transformer.tok_emb.weight"]
        ours = load_checkpoint(converted[kind], kind="transformer")["model"]["tok_emb.weight"]
        conditions = len(ours) - CODES - 1
        assert torch.equal(ours[:CODES], theirs[:CODES]) and torch.equal(ours[CODES:-1], theirs[:conditions])
        assert torch.equal(ours[-1], theirs[sos] if sos is not None else theirs[:conditions].mean(0))
        assert conditions == (40 if kind == "class" else 0)


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of two 8x8 images (images/) with their segmentation maps (conditions/, labels 0..4)."""
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        _write_png(folder / "images" / f"{name}.png", rng.integers(0, 256, (RESOLUTION, RESOLUTION, 3), np.uint8))
        _write_png(folder / "conditions" / f"{name}.png", rng.integers(0, 5, (RESOLUTION, RESOLUTION), np.uint8))
    return folder


@pytest.mark.parametrize("kind", KINDS)
def test_generate_samples_and_completes_with_a_converted_prior(kind: str, converted: dict[str, Path], inputs: Path,
                                                               tmp_path: Path) -> None:
    common = ["--checkpoint", converted[kind], "--device", "cpu", "--top-k", 4]
    extra = {"class": ["--class", 1, 39], "segmentation": ["--condition", inputs],
             "depth": ["--condition", inputs]}.get(kind, [])
    run("sample", *common, "--num", 2, "--out", tmp_path / "samples", *extra)
    assert len(list((tmp_path / "samples").glob("*.png"))) == 3  # two samples and the grid
    images = inputs if kind in ("segmentation", "depth") else inputs / "images"
    run("complete", *common, "--input", images, "--out", tmp_path / "completed",
        *(["--class", 5] if kind == "class" else []))
    assert sorted(p.name for p in (tmp_path / "completed").glob("*.png")) == ["a.png", "b.png", "grid.png"]


def _edited_config(kind: str, folder: Path, edit: dict) -> Path:
    config = yaml.safe_load((FIXTURES / f"taming_stage2_{kind}.yaml").read_text())
    config["model"]["params"].update(edit)
    return write_config(folder, "model", config)


@pytest.mark.parametrize("case", ["no config", "permuter", "unknown condition stage", "config mismatch",
                                  "no n_head", "resized conditions", "more classes than tokens", "too long"])
def test_unconvertible_transformers_are_refused(case: str, taming_files: dict[str, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    gpt = yaml.safe_load((FIXTURES / "taming_stage2_class.yaml").read_text())["model"]["params"]["transformer_config"]
    edits = {
        "permuter": ({"permuter_config": {"target": "taming.modules.transformer.permuter.ZCurve"}},
                     ["permuter taming.modules.transformer.permuter.ZCurve", "raster order"]),
        "unknown condition stage": ({"cond_stage_config": {"target": "my.own.Stage"}},
                                    ["condition stage 'my.own.Stage'", "Labelator"]),
        "config mismatch": ({"transformer_config": {**gpt, "params": {**gpt["params"], "n_embd": 16}}},
                            ["n_embd: config 16, tensors 8"]),
        "no n_head": ({"transformer_config": {**gpt, "params": {**gpt["params"], "n_head": None}}},
                      ["n_head"]),
        "resized conditions": ({"downsample_cond_size": 4}, ["downsample_cond_size"]),
        "more classes than tokens": ({"cond_stage_config": {"target": "taming.modules.util.Labelator",
                                                            "params": {"n_classes": 50}}},
                                     ["vocabulary of 40 tokens", "class condition has 50 tokens"]),
    }
    args = ["--checkpoint", taming_files["class"]]
    if case == "no config":
        phrases = ["Net2NetTransformer", "only its config says", "--config"]
    elif case == "too long":  # 16x16 images: 64 tokens, more than the GPT's 17 positions
        args += ["--config", FIXTURES / "taming_stage2_class.yaml", "--resolution", 16]
        phrases = ["block_size 17", "need 64 positions"]
    else:
        edit, phrases = edits[case]
        if case == "no n_head":
            edit["transformer_config"]["params"].pop("n_head")
        args += ["--config", _edited_config("class", tmp_path, edit)]
        phrases = phrases + ["model.yaml"]
    out = tmp_path / "out" / "prior.pt"
    err = script_fails(capsys, generate.main, "import-taming", *args, "--out", out)
    for phrase in phrases + [str(taming_files["class"])]:
        assert phrase in err, f"{phrase!r} not in {err!r}"
    assert not out.parent.exists()


def test_a_converted_prior_needs_no_import(converted: dict[str, Path], tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    err = script_fails(capsys, generate.main, "import-taming", "--checkpoint", converted["class"], "--out",
                       tmp_path / "again.pt")
    assert "checkpoint of this repository (kind 'transformer')" in err and "generate.py sample or complete" in err


def test_existing_output_is_kept_unless_forced(taming_files: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "prior.pt"
    out.write_bytes(b"keep")
    args = ["import-taming", "--checkpoint", taming_files["none"], "--config", FIXTURES / "taming_stage2_none.yaml",
            "--out", out]
    err = script_fails(capsys, generate.main, *args)
    assert "already exists" in err and "--force" in err and out.read_bytes() == b"keep"
    run(*args, "--force")
    assert load_checkpoint(out, kind="transformer")["prior_config"]["condition"] == "none"


def test_gumbel_vqgan_picks_the_most_likely_code_and_decodes_as_taming(converted: dict[str, Path],
                                                                        expected: dict) -> None:
    vqgan, state = generate.load_vqgan(str(converted["gumbel"]), torch.device("cpu"))
    entry = expected["gumbel"]
    assert state["model_config"]["quantizer"] == "gumbel"
    with torch.no_grad():
        codes = vqgan.encode_to_indices(entry["images"])
        out = vqgan(entry["images"])
        decoded = vqgan.decode_indices(entry["given"])
    assert torch.equal(codes, entry["logits"].argmax(1)) and torch.equal(codes.flatten(), entry["codes"].flatten())
    assert torch.equal(out.indices, codes)
    assert (out.reconstruction - entry["reconstructions"]).abs().max() < TOLERANCE
    assert (decoded - entry["decoded"]).abs().max() < 1e-6


def test_gumbel_vqgan_works_in_generate_and_refuses_training(converted: dict[str, Path], inputs: Path,
                                                             tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = converted["gumbel"]
    run("reconstruct", "--checkpoint", path, "--input", inputs / "images", "--out", tmp_path / "rec", "--device", "cpu")
    assert "psnr" in capsys.readouterr().out
    run("tokens", "--checkpoint", path, "--input", inputs / "images", "--out", tmp_path / "t.npy", "--device", "cpu")
    run("tokens", "--decode", "--checkpoint", path, "--input", tmp_path / "t.npy", "--out", tmp_path / "decoded",
        "--device", "cpu")
    assert np.load(tmp_path / "t.npy").shape == (2, 4, 4) and (tmp_path / "decoded" / "grid.png").is_file()

    stored = from_dict(Stage1Config, load_checkpoint(path)["config"])
    stored.validate_description()  # the stored config is valid as a description
    with pytest.raises(ConfigError, match="training it is not supported"):
        stored.validate()
    with pytest.raises(ConfigError, match="'sampled' is not one of 'nearest', 'gumbel'"):
        load_config(Stage1Config, None, ["model.quantizer=sampled"])
    config = write_config(tmp_path, "tune", {"data": {"name": "folder", "root": str(inputs / "images"),
                                                      "image_size": RESOLUTION}})
    err = script_fails(capsys, train_vqgan.main, "--config", config, "--run-dir", tmp_path / "run",
                       f"train.init_from={path}", "model.quantizer=gumbel")
    assert "model.quantizer=gumbel" in err and "model.quantizer=nearest" in err and not (tmp_path / "run").exists()

    vqgan, _ = generate.load_vqgan(str(path), torch.device("cpu"))
    with pytest.raises(RuntimeError, match="training it is not supported"):
        vqgan.train()(torch.zeros(1, 3, RESOLUTION, RESOLUTION))
    with pytest.raises(ValueError, match="none of the codebook_dim, l2_norm and ema options"):
        VQGAN(VQGANConfig(quantizer="gumbel", ema=True), in_channels=3, resolution=RESOLUTION)

"""The conditional pipeline through the scripts, on tiny checkpoints: a segmentation tokenizer (train_vqgan.py),
segmentation, low-res and coordinate priors (train_transformer.py --cond-vqgan), generate.py sample --condition
and complete, and the clean errors of each step."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_training import STAGE1, STAGE2, load_plain, write_config
from tiny_training import script_fails as fails

import generate
import train_transformer
import train_vqgan
from dataloader import build_dataset
from utils.config import DataConfig

SIZE = 16  # images are 16x16 RGB; both tokenizers give 8x8 tokens
NUM_LABELS = 11  # the builtin data's 10 classes + background
TEST_ITEMS = 8  # STAGE1's data.eval_samples


def merged(base: dict, **sections: dict) -> dict:
    """``base`` with the keys of ``sections`` replaced, section by section."""
    config = copy.deepcopy(base)
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


SEGMENTATION_DATA = {"condition": "segmentation", "num_labels": NUM_LABELS}
TOKENIZER = merged(STAGE1, data={**SEGMENTATION_DATA, "content": "conditions"},
                   loss={"rec_loss": "cross_entropy", "perceptual_weight": 0.0, "disc_weight": 0.0})
SEGMENTATION_PRIOR = merged(STAGE2, data=SEGMENTATION_DATA, transformer={"condition": "segmentation"})
LOWRES_PRIOR = merged(STAGE2, data={"condition": "lowres", "lowres_factor": 4}, transformer={"condition": "lowres"})
COORD_PRIOR = merged(STAGE2, data={"condition": "coord"}, transformer={"condition": "coord", "coord_levels": 16})


@dataclass
class Checkpoints:
    folder: Path
    vqgan: Path  # image VQGAN
    tokenizer: Path  # segmentation tokenizer
    segmentation: Path
    lowres: Path
    coord: Path
    classes: Path
    unconditional: Path
    cache: Path  # the segmentation prior's token cache folder
    configs: dict[str, Path]


def last(folder: Path, run: str) -> Path:
    return folder / run / "checkpoints" / "last.pt"


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    """2-step image VQGAN and segmentation tokenizer; 2-step segmentation, low-res, coordinate, class and
    unconditional priors on them."""
    folder = tmp_path_factory.mktemp("conditional_ckpts")
    configs = {name: write_config(folder, name, config) for name, config in (
        ("vqgan", STAGE1), ("tokenizer", TOKENIZER), ("segmentation", SEGMENTATION_PRIOR), ("lowres", LOWRES_PRIOR),
        ("coord", COORD_PRIOR), ("classes", STAGE2))}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        for name in ("vqgan", "tokenizer"):
            train_vqgan.main(["--config", str(configs[name]), "--run-dir", name, "train.max_steps=2"])
        vqgan, tokenizer = last(folder, "vqgan"), last(folder, "tokenizer")
        runs = {"segmentation": ["--cond-vqgan", str(tokenizer), "--token-cache", str(folder / "cache")],
                "lowres": ["--cond-vqgan", str(vqgan)], "coord": [], "classes": []}
        for name, extra in runs.items():
            train_transformer.main(["--config", str(configs[name]), "--vqgan", str(vqgan), "--run-dir", name,
                                    "train.max_steps=2", *extra])
        train_transformer.main(["--config", str(configs["classes"]), "--vqgan", str(vqgan), "--run-dir",
                                "unconditional", "train.max_steps=2", "transformer.condition=none"])
    return Checkpoints(folder, vqgan, tokenizer, last(folder, "segmentation"), last(folder, "lowres"),
                       last(folder, "coord"), last(folder, "classes"), last(folder, "unconditional"), folder / "cache",
                       configs)


def run(*args: object) -> None:
    generate.main([str(a) for a in args])


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png"))


def numbered(count: int, per_input: int) -> list[str]:
    """``000000_0.png ...``: the outputs of ``per_input`` samples of each of ``count`` test items."""
    return [f"{i:06d}_{k}.png" for i in range(count) for k in range(per_input)]


def save_png(path: Path, values: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint8)).save(path)
    return path


def picture(seed: int, size: int = 20) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3))


def labels(top: int, size: int = 20) -> np.ndarray:
    """A label map: background with a square of label ``top``."""
    values = np.zeros((size, size), np.uint8)
    values[4:12, 6:14] = top
    return values


def paired_folder(root: Path, lonely_condition: bool = True) -> Path:
    """images/a.png, images/b.png with their label maps conditions/a.png, conditions/b.png (20x20, resized to the
    model's 16x16), and a map conditions/c.png without an image."""
    for i, name in enumerate("ab"):
        save_png(root / "images" / f"{name}.png", picture(i))
        save_png(root / "conditions" / f"{name}.png", labels(3 + i))
    if lonely_condition:
        save_png(root / "conditions" / "c.png", labels(NUM_LABELS - 1))
    return root


# ---------------------------------------------------------------- training: checkpoints and token cache


def test_checkpoints_carry_their_condition_tokenizer(ckpts: Checkpoints) -> None:
    state = load_plain(ckpts.segmentation)
    tokenizer_state = load_plain(ckpts.tokenizer)
    assert state["cond_vqgan_config"] == tokenizer_state["model_config"]
    assert state["cond_vqgan_config"]["num_labels"] == NUM_LABELS
    prior, _ = generate.load_prior(ckpts.segmentation, torch.device("cpu"))
    tokenizer, _ = generate.load_vqgan(ckpts.tokenizer, torch.device("cpu"))
    assert prior.condition.kind == "segmentation" and prior.prefix_len == 64  # the map's 8x8 tokens
    assert prior.cond_vqgan is not None and prior.cond_vqgan.num_labels == NUM_LABELS
    saved = prior.cond_vqgan.state_dict()
    assert saved.keys() == state["cond_vqgan"].keys() == tokenizer.state_dict().keys()
    assert all(torch.equal(value, tokenizer.state_dict()[key]) for key, value in saved.items())

    lowres, _ = generate.load_prior(ckpts.lowres, torch.device("cpu"))  # the image VQGAN tokenizes its maps
    vqgan, _ = generate.load_vqgan(ckpts.vqgan, torch.device("cpu"))
    assert lowres.condition.kind == "lowres" and lowres.cond_vqgan is not None
    assert all(torch.equal(value, vqgan.state_dict()[key]) for key, value in lowres.cond_vqgan.state_dict().items())

    for path, kind in ((ckpts.coord, "coord"), (ckpts.classes, "class"), (ckpts.unconditional, "none")):
        assert "cond_vqgan" not in load_plain(path)
        prior, _ = generate.load_prior(path, torch.device("cpu"))
        assert prior.condition.kind == kind and prior.cond_vqgan is None


def test_token_cache_holds_the_condition_tokens_and_is_reused(ckpts: Checkpoints, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    files = list(ckpts.cache.iterdir())
    assert len(files) == 1
    tokens = torch.load(files[0], weights_only=True)
    data = DataConfig(**TOKENIZER["data"])  # the tokenizer's data: label maps first
    maps = torch.stack([item[0] for item in build_dataset(data, "train")])
    tokenizer, _ = generate.load_vqgan(ckpts.tokenizer, torch.device("cpu"))
    assert tokens["conditions"].dtype == torch.int32 and tokens["conditions"].shape == (len(maps), 64)
    assert tokens["indices"].shape == (len(maps), 64)
    assert torch.equal(tokens["conditions"].long(), tokenizer.encode_to_indices(maps).flatten(1))

    def train(run_dir: str, cond_vqgan: Path, *args: str) -> None:
        train_transformer.main([str(a) for a in ("--config", ckpts.configs["segmentation"], "--vqgan", ckpts.vqgan,
                                                 "--token-cache", ckpts.cache, "--run-dir", tmp_path / run_dir,
                                                 "--cond-vqgan", cond_vqgan, *args)])

    before = {path.name: path.stat().st_mtime_ns for path in ckpts.cache.iterdir()}
    train("again", ckpts.tokenizer, "train.max_steps=1")
    assert {path.name: path.stat().st_mtime_ns for path in ckpts.cache.iterdir()} == before

    state = load_plain(ckpts.tokenizer)  # another condition tokenizer: other tokens, another cache file
    state["model"] = {key: value + 0.01 if value.is_floating_point() else value
                      for key, value in state["model"].items()}
    other = tmp_path / "other_tokenizer.pt"
    torch.save(state, other)
    train("other", other, "train.max_steps=1")
    assert len(list(ckpts.cache.iterdir())) == 2
    segmentation = DataConfig(**SEGMENTATION_PRIOR["data"])
    name = train_transformer.token_cache_name([str(ckpts.vqgan), str(ckpts.tokenizer)], segmentation, "train")
    assert name == files[0].name
    assert name != train_transformer.token_cache_name([str(ckpts.vqgan), str(other)], segmentation, "train")
    assert name != train_transformer.token_cache_name([str(ckpts.vqgan)], segmentation, "train")
    assert (ckpts.cache / train_transformer.token_cache_name([str(ckpts.vqgan), str(other)], segmentation,
                                                             "train")).is_file()

    capsys.readouterr()  # resuming must keep the condition tokenizer: its codes are what the GPT learned
    with pytest.raises(SystemExit) as exit_info:
        train("again", other, "--resume", "train.max_steps=2")
    assert exit_info.value.code == 2
    assert f"--cond-vqgan {other} is not the stage-1 model this run was started with" in capsys.readouterr().err


# ---------------------------------------------------------------- generate.py sample --condition


def test_sample_test_conditions(ckpts: Checkpoints, tmp_path: Path) -> None:
    for out, seed in (("a", 0), ("b", 0)):
        run("sample", "--checkpoint", ckpts.segmentation, "--condition", "test", "--num", 3,
            "--samples-per-condition", 2, "--seed", seed, "--out", tmp_path / out, "--device", "cpu")
    assert names(tmp_path / "a") == [*numbered(3, 2), "grid.png"]
    outputs = [tmp_path / "a" / name for name in numbered(3, 2)]
    assert all(pixels(path).shape == (SIZE, SIZE, 3) for path in outputs)
    assert all(path.read_bytes() == (tmp_path / "b" / path.name).read_bytes() for path in outputs)

    run("sample", "--checkpoint", ckpts.lowres, "--condition", "test", "--num", 2, "--out", tmp_path / "lowres")
    assert names(tmp_path / "lowres") == ["000000.png", "000001.png", "grid.png"]
    run("sample", "--checkpoint", ckpts.coord, "--num", 3, "--out", tmp_path / "coord")  # whole images
    assert names(tmp_path / "coord") == ["000000.png", "000001.png", "000002.png", "grid.png"]


def test_sample_folder_conditions(ckpts: Checkpoints, tmp_path: Path) -> None:
    paired = paired_folder(tmp_path / "paired")
    run("sample", "--checkpoint", ckpts.segmentation, "--condition", paired, "--out", tmp_path / "p")
    assert names(tmp_path / "p") == ["a.png", "b.png", "c.png", "grid.png"]
    assert all(pixels(tmp_path / "p" / name).shape == (SIZE, SIZE, 3) for name in ("a.png", "b.png", "c.png"))

    flat = tmp_path / "flat"
    for name, top in (("x", 1), ("y", NUM_LABELS - 1)):
        save_png(flat / f"{name}.png", labels(top, size=16))
    run("sample", "--checkpoint", ckpts.segmentation, "--condition", flat, "--samples-per-condition", 2, "--out",
        tmp_path / "f")
    assert names(tmp_path / "f") == ["grid.png", "x_0.png", "x_1.png", "y_0.png", "y_1.png"]

    small = tmp_path / "small"  # a low-res prior's conditions: low-resolution images of any size
    save_png(small / "s.png", picture(5, size=4))
    run("sample", "--checkpoint", ckpts.lowres, "--condition", small, "--out", tmp_path / "s")
    assert names(tmp_path / "s") == ["grid.png", "s.png"]
    assert pixels(tmp_path / "s" / "s.png").shape == (SIZE, SIZE, 3)


# ---------------------------------------------------------------- generate.py sample --size (sliding window)


@pytest.mark.parametrize("kind, size", [("segmentation", [24]), ("lowres", [20]), ("coord", [24, 18]),
                                        ("classes", [18, 24]), ("unconditional", [20, 16])])
def test_sample_beyond_the_training_size(kind: str, size: list[int], ckpts: Checkpoints, tmp_path: Path) -> None:
    conditions = ["--condition", "test"] if kind in ("segmentation", "lowres") else []
    run("sample", "--checkpoint", getattr(ckpts, kind), "--size", *size, *conditions, "--num", 2, "--out",
        tmp_path / "big")
    height, width = size * 2 if len(size) == 1 else size
    assert all(pixels(tmp_path / "big" / name).shape == (height, width, 3) for name in ("000000.png", "000001.png"))


def test_bad_sizes_are_refused(ckpts: Checkpoints, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def size_fails(checkpoint: Path, *args: object) -> str:
        return fails(capsys, generate.main, "sample", "--checkpoint", checkpoint, "--out", tmp_path / "x", *args)

    assert "multiples of the VQGAN's downsampling factor 2; try --size 24 20" in size_fails(ckpts.classes, "--size",
                                                                                             23, 20)
    assert "smaller than the prior's training size 16x16" in size_fails(ckpts.classes, "--size", 32, 8)
    assert "--size takes the height and width" in size_fails(ckpts.classes, "--size", 16, 16, 16)
    assert "condition maps are read as squares" in size_fails(ckpts.segmentation, "--condition", "test", "--size",
                                                              24, 32)
    assert "leave out --size" in size_fails(ckpts.classes, "--size", 24, "--fid-ref", "test")
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


# ---------------------------------------------------------------- generate.py complete


@pytest.mark.parametrize("kind", ["segmentation", "lowres", "coord", "classes", "unconditional"])
def test_complete_test_inputs_is_seeded(kind: str, ckpts: Checkpoints, tmp_path: Path) -> None:
    checkpoint = getattr(ckpts, kind)
    for out, seed in (("a", 3), ("b", 3)):
        run("complete", "--checkpoint", checkpoint, "--input", "test", "--keep", 0.5, "--num", 2,
            "--samples-per-input", 2, "--seed", seed, "--out", tmp_path / out)
    assert names(tmp_path / "a") == [*numbered(2, 2), "grid.png"]
    outputs = [tmp_path / "a" / name for name in numbered(2, 2)]
    assert all(pixels(path).shape == (SIZE, SIZE, 3) for path in outputs)
    assert all(path.read_bytes() == (tmp_path / "b" / path.name).read_bytes() for path in outputs)


SampleCall = tuple[generate.VQGANPrior, torch.Tensor | None, torch.Tensor | None]


def record_samples(monkeypatch: pytest.MonkeyPatch) -> list[SampleCall]:
    """The (prior, condition, given) of every ``VQGANPrior.sample`` call from now on (which still samples)."""
    calls: list[SampleCall] = []
    sample = generate.VQGANPrior.sample

    def recorded(prior: generate.VQGANPrior, num: int, condition: torch.Tensor | None = None,
                 **options: object) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append((prior, condition, options.get("given")))
        return sample(prior, num, condition, **options)

    monkeypatch.setattr(generate.VQGANPrior, "sample", recorded)
    return calls


def test_complete_keeps_the_top_rows_of_the_inputs_codes(ckpts: Checkpoints, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    calls = record_samples(monkeypatch)
    run("complete", "--checkpoint", ckpts.segmentation, "--input", "test", "--keep", 0.3, "--num", 3,
        "--samples-per-input", 2, "--out", tmp_path / "out")
    [(prior, condition, given)] = calls
    dataset = build_dataset(DataConfig(**SEGMENTATION_PRIOR["data"]), "test")
    images = torch.stack([dataset[i][0] for i in range(3)])
    maps = torch.stack([dataset[i][1] for i in range(3)])
    rows = round(0.3 * 8)  # of the 8 token rows
    assert given.shape == (6, rows * 8)
    assert torch.equal(given, prior.encode(images)[:, :rows * 8].repeat_interleave(2, dim=0))
    assert torch.equal(condition, maps.repeat_interleave(2, dim=0))

    calls.clear()  # a class prior completes each input with its own class (builtin item i has class i % 10) ...
    run("complete", "--checkpoint", ckpts.classes, "--input", "test", "--num", 3, "--samples-per-input", 2,
        "--out", tmp_path / "classes")
    [(prior, condition, given)] = calls
    assert condition.tolist() == [0, 0, 1, 1, 2, 2] and given.shape == (6, 4 * 8)
    calls.clear()  # ... or with the --class ids in turn
    run("complete", "--checkpoint", ckpts.classes, "--input", "test", "--num", 3, "--class", 7, 9, "--out",
        tmp_path / "given_classes")
    assert calls[0][1].tolist() == [7, 9, 7]


def test_complete_folders(ckpts: Checkpoints, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    paired = paired_folder(tmp_path / "paired", lonely_condition=False)
    run("complete", "--checkpoint", ckpts.segmentation, "--input", paired, "--out", tmp_path / "seg")
    assert names(tmp_path / "seg") == ["a.png", "b.png", "grid.png"]

    plain = tmp_path / "plain"
    for i in range(2):
        save_png(plain / f"{i}.png", picture(i))
    for kind in ("lowres", "coord", "unconditional"):  # low-res and coordinate maps derived from the images
        run("complete", "--checkpoint", getattr(ckpts, kind), "--input", plain, "--out", tmp_path / kind)
        assert names(tmp_path / kind) == ["0.png", "1.png", "grid.png"]

    err = fails(capsys, generate.main, "complete", "--checkpoint", ckpts.classes, "--input", plain, "--out",
                tmp_path / "classes")
    assert "have no class labels: pass --class C" in err and not names(tmp_path / "classes")
    run("complete", "--checkpoint", ckpts.classes, "--input", plain, "--class", 3, "--samples-per-input", 2,
        "--out", tmp_path / "classes")
    assert names(tmp_path / "classes") == ["0_0.png", "0_1.png", "1_0.png", "1_1.png", "grid.png"]


def test_depth_prior_on_a_paired_folder(ckpts: Checkpoints, tmp_path: Path) -> None:
    root = tmp_path / "depth"
    ramp = np.tile(np.linspace(0, 255, SIZE), (SIZE, 1))
    for i in range(20):  # 2 of them held out
        save_png(root / "images" / f"{i:02d}.png", picture(i, size=SIZE))
        save_png(root / "conditions" / f"{i:02d}.png", ramp if i % 2 else ramp.T)  # 8-bit depth maps
    data = {"name": "folder", "root": str(root), "eval_samples": 2, "condition": "depth"}
    tokenizer = write_config(tmp_path, "depth_vqgan", merged(STAGE1, data={**data, "content": "conditions"}))
    prior = write_config(tmp_path, "depth_prior", merged(STAGE2, data=data, transformer={"condition": "depth"}))
    train_vqgan.main([str(a) for a in ("--config", tokenizer, "--run-dir", tmp_path / "t", "train.max_steps=2")])
    train_transformer.main([str(a) for a in ("--config", prior, "--run-dir", tmp_path / "p", "--vqgan", ckpts.vqgan,
                                             "--cond-vqgan", last(tmp_path, "t"), "train.max_steps=2")])
    checkpoint = last(tmp_path, "p")
    assert load_plain(checkpoint)["cond_vqgan_config"]["in_channels"] == 1
    run("sample", "--checkpoint", checkpoint, "--condition", "test", "--out", tmp_path / "test")
    assert names(tmp_path / "test") == ["000000.png", "000001.png", "grid.png"]  # the 2 held-out pairs
    run("sample", "--checkpoint", checkpoint, "--condition", root, "--num", 3, "--out", tmp_path / "folder")
    assert names(tmp_path / "folder") == ["00.png", "01.png", "02.png", "grid.png"]
    run("complete", "--checkpoint", checkpoint, "--input", root, "--num", 2, "--out", tmp_path / "complete")
    assert names(tmp_path / "complete") == ["00.png", "01.png", "grid.png"]


# ---------------------------------------------------------------- clean errors


def test_training_errors_name_the_fix(ckpts: Checkpoints, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def prior_fails(config: str, *args: object) -> str:
        return fails(capsys, train_transformer.main, "--config", ckpts.configs[config], "--vqgan", ckpts.vqgan,
                     "--run-dir", tmp_path / "run", "train.max_steps=1", *args)

    err = prior_fails("segmentation")
    assert "transformer.condition=segmentation needs" in err and "--cond-vqgan COND.pt" in err
    err = prior_fails("classes", "--cond-vqgan", ckpts.tokenizer)
    assert "transformer.condition=class needs no condition tokenizer" in err and "Leave --cond-vqgan out" in err
    err = prior_fails("segmentation", "--cond-vqgan", ckpts.vqgan)
    assert f"--cond-vqgan {ckpts.vqgan} tokenizes 3-channel maps at {SIZE}px" in err
    assert f"segmentation maps of {NUM_LABELS} labels" in err and "data.content=conditions" in err
    err = prior_fails("segmentation", "--cond-vqgan", ckpts.tokenizer, "data.condition=none")
    assert "set data.condition=segmentation" in err
    err = prior_fails("lowres", "--cond-vqgan", ckpts.tokenizer)
    assert f"tokenizes segmentation maps of {NUM_LABELS} labels" in err and "lowres maps of 3 channel(s)" in err
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()

    def tokenizer_fails(*overrides: str) -> str:
        return fails(capsys, train_vqgan.main, "--config", ckpts.configs["tokenizer"], "--run-dir",
                     tmp_path / "tokenizer", *overrides)

    err = tokenizer_fails("loss.rec_loss=l1")
    assert "set loss.rec_loss=cross_entropy (it is l1)" in err
    err = tokenizer_fails("loss.perceptual_weight=0.5")
    assert "loss.perceptual_weight=0.5" in err and "set loss.perceptual_weight=0" in err
    err = tokenizer_fails("loss.disc_weight=0.1")
    assert "set loss.disc_weight=0" in err
    assert not (tmp_path / "tokenizer" / "checkpoints").exists()


def test_generate_errors_name_the_fix(ckpts: Checkpoints, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"

    def generate_fails(*args: object) -> str:
        return fails(capsys, generate.main, *args, "--out", out)

    err = generate_fails("sample", "--checkpoint", ckpts.segmentation)
    assert "conditioned on segmentation maps: pass them with --condition" in err
    err = generate_fails("sample", "--checkpoint", ckpts.classes, "--condition", "test")
    assert "this prior is conditioned on class; leave --condition out" in err
    err = generate_fails("complete", "--checkpoint", ckpts.segmentation, "--input", "test", "--keep", 1)
    assert "--keep 1.0 keeps all 8 token rows" in err and "use a value below" in err

    bad = paired_folder(tmp_path / "bad", lonely_condition=False)
    save_png(bad / "conditions" / "b.png", labels(NUM_LABELS))
    err = generate_fails("sample", "--checkpoint", ckpts.segmentation, "--condition", bad)
    assert f"'{bad / 'conditions' / 'b.png'}' holds label {NUM_LABELS}" in err and "data.num_labels" in err

    lonely = paired_folder(tmp_path / "lonely")
    err = generate_fails("complete", "--checkpoint", ckpts.segmentation, "--input", lonely)
    assert "needs the image of every condition" in err and ": c." in err
    assert not out.exists() or not names(out)


def test_image_commands_on_conditional_checkpoints_and_data(ckpts: Checkpoints, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    tokenizer_pictures = {"reconstructions.png", "codebook_usage.png", "token_maps.png"}
    run("visualize", "--checkpoint", ckpts.segmentation, "--out", tmp_path / "seg", "--num", 2, "--per-class", 2)
    assert names(tmp_path / "seg") == sorted(tokenizer_pictures)  # its samples need maps: generate.py sample
    assert "sample --condition" in capsys.readouterr().out
    for kind in ("lowres", "coord"):
        run("visualize", "--checkpoint", getattr(ckpts, kind), "--out", tmp_path / kind, "--num", 2, "--per-class",
            2)
        expected = tokenizer_pictures | ({"samples.png"} if kind == "coord" else set())
        assert set(names(tmp_path / kind)) == expected

    run("reconstruct", "--checkpoint", ckpts.vqgan, "--input", ckpts.configs["segmentation"], "--out",
        tmp_path / "rec")  # the images of data with condition maps
    assert names(tmp_path / "rec") == [f"{i:06d}.png" for i in range(TEST_ITEMS)] + ["grid.png"]
    run("tokens", "--checkpoint", ckpts.vqgan, "--input", ckpts.configs["lowres"], "--out", tmp_path / "t.npy")
    assert np.load(tmp_path / "t.npy").shape == (TEST_ITEMS, 8, 8)

    err = fails(capsys, generate.main, "reconstruct", "--checkpoint", ckpts.tokenizer, "--input", "test", "--out",
                tmp_path / "x")
    assert f"tokenizes segmentation maps of {NUM_LABELS} labels, not images" in err
    err = fails(capsys, generate.main, "tokens", "--decode", "--checkpoint", ckpts.tokenizer, "--input",
                tmp_path / "t.npy", "--out", tmp_path / "x")
    assert "Pass an image VQGAN" in err and not names(tmp_path / "x")


def test_folder_of_images_without_their_maps(ckpts: Checkpoints, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "only_images"
    save_png(folder / "images" / "a.png", picture(0))
    for command in (["sample", "--checkpoint", ckpts.segmentation, "--condition", folder],
                    ["complete", "--checkpoint", ckpts.segmentation, "--input", folder]):
        err = fails(capsys, generate.main, *command, "--out", tmp_path / "out")
        assert "no conditions/ folder" in err and f"{folder / 'conditions'}/NAME.png" in err

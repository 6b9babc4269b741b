"""The Fashion-MNIST pair writer and the quality figures of conditional samples, on tiny folders written here."""

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks import conditional_quality
from benchmarks.conditional_quality import QualityError, sample_groups, segmentation_quality, superres_quality
from benchmarks.make_paired_fashion_mnist import MASK_THRESHOLD, RECORD, FolderInUse, main, make_pairs
from dataloader.folder import load_image, resize_center_crop
from dataloader.paired import load_paired
from dataloader.standard import IDX_FILES
from utils.pictures import save_images

TRAIN, TEST = 6, 4


def write_idx(path: Path, array: np.ndarray) -> None:
    """``array`` (uint8) as a gzip-compressed idx file."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def garments(count: int, seed: int) -> np.ndarray:
    """28x28 pictures: a bright block, alternately in the left and the right half, in a faint fringe (value 4)."""
    rng = np.random.default_rng(seed)
    images = np.zeros((count, 28, 28), np.uint8)
    for i, image in enumerate(images):
        left = 2 if i % 2 == 0 else 15
        top = int(rng.integers(2, 8))
        image[top - 1:top + 17, left - 1:left + 12] = 4
        image[top:top + 16, left:left + 11] = rng.integers(30, 256, (16, 11))
    return images


@pytest.fixture
def idx_root(tmp_path: Path) -> Path:
    root = tmp_path / "fmnist"
    root.mkdir()
    for split, count, seed in (("train", TRAIN, 0), ("test", TEST, 1)):
        images_name, labels_name = IDX_FILES[split]
        write_idx(root / f"{images_name}.gz", garments(count, seed))
        write_idx(root / f"{labels_name}.gz", np.arange(count) % 10)
    return root


@pytest.fixture
def pairs(tmp_path: Path, idx_root: Path) -> Path:
    make_pairs(tmp_path / "pairs", idx_root)
    return tmp_path / "pairs"


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "L"
        return np.asarray(image)


def test_pair_writer_keeps_the_images_and_thresholds_the_masks(tmp_path: Path, idx_root: Path, capsys) -> None:
    out = tmp_path / "pairs"
    record = main(["--out", str(out), "--root", str(idx_root), "--limit-train", "5"])
    assert "wrote 5 train pairs" in capsys.readouterr().out
    assert (record["train"]["pairs"], record["test"]["pairs"], record["threshold"]) == (5, TEST, MASK_THRESHOLD)
    for split, images in (("train", garments(TRAIN, 0)[:5]), ("test", garments(TEST, 1))):
        names = sorted(p.name for p in (out / split / "images").iterdir())
        assert names == [f"{i:06d}.png" for i in range(len(images))]
        for i, image in enumerate(images):
            assert np.array_equal(pixels(out / split / "images" / f"{i:06d}.png"), image)
            mask = pixels(out / split / "conditions" / f"{i:06d}.png")
            assert np.array_equal(mask, (image > MASK_THRESHOLD).astype(np.uint8))
            assert mask.sum() == 16 * 11  # the block without its fringe
    test = load_paired(out, "test", "segmentation", 28, 1, num_labels=2)  # a paired folder the loader takes
    assert len(test) == TEST and int(test[0][1].max()) == 1
    assert json.loads((out / RECORD).read_text())["complete"]


def test_mosaics_tile_consecutive_garments(tmp_path: Path, idx_root: Path, capsys) -> None:
    out = tmp_path / "mosaics"
    record = main(["--out", str(out), "--root", str(idx_root), "--mosaic", "2"])
    assert "images: 56x56" in capsys.readouterr().out
    assert (record["train"]["pairs"], record["mosaic"]) == (1, 2)  # 6 garments fill one mosaic of four
    garment = garments(TRAIN, 0)
    image, mask = (pixels(out / "train" / kind / "000000.png") for kind in ("images", "conditions"))
    assert image.shape == (56, 56) and np.array_equal(image[:28, 28:], garment[1])
    assert np.array_equal(image[28:, :28], garment[2]) and np.array_equal(mask, (image > MASK_THRESHOLD))
    with pytest.raises(SystemExit, match="would hold no 2x2 mosaic"):
        main(["--out", str(tmp_path / "none"), "--root", str(idx_root), "--mosaic", "2", "--limit-test", "3"])


def test_pair_writer_refuses_a_folder_it_did_not_write(tmp_path: Path, idx_root: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FolderInUse, match="not empty"):
        make_pairs(out, idx_root)
    with pytest.raises(SystemExit, match="refusing"):
        main(["--out", str(out), "--root", str(idx_root)])
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    with pytest.raises(SystemExit, match="train-images-idx3-ubyte"):
        main(["--out", str(tmp_path / "new"), "--root", str(tmp_path)])
    ours = tmp_path / "ours"
    make_pairs(ours, idx_root)
    make_pairs(ours, idx_root, {"train": 2})  # its own folder: rewritten, the pairs beyond the new count removed
    assert sorted(p.name for p in (ours / "train" / "conditions").iterdir()) == ["000000.png", "000001.png"]


def test_segmentation_iou_is_one_for_the_real_images_and_low_against_wrong_maps(tmp_path: Path, pairs: Path,
                                                                               capsys) -> None:
    exact = tmp_path / "exact"
    exact.mkdir()
    for path in (pairs / "test" / "images").iterdir():
        (exact / path.name).write_bytes(path.read_bytes())
    figures = segmentation_quality(exact, pairs / "test")
    assert (figures["n_samples"], figures["iou"], figures["pixel_accuracy"], figures["iou_real_images"]) == \
           (TEST, 1.0, 1.0, 1.0)
    assert figures["iou_wrong_map"] == 0.0 and figures["pixel_accuracy_wrong_map"] < 0.6  # blocks in other halves
    assert figures["diversity_l1"] is None
    resized = tmp_path / "resized"  # at a model's size (32), two samples per condition, one of them darker
    for path in sorted((pairs / "test" / "images").iterdir())[:2]:
        with Image.open(path) as image:
            big = np.asarray(resize_center_crop(image, 32)).astype(np.float32)
        save_images(torch.tensor(np.stack([big, big * 0.8]))[:, None] / 127.5 - 1, resized,
                    names=[f"{path.stem}_0", f"{path.stem}_1"])
    figures = conditional_quality.main(["segmentation", "--samples", str(resized), "--pairs", str(pairs / "test"),
                                        "--json", str(tmp_path / "seg.json")])
    assert (figures["n_conditions"], figures["n_conditions_sampled"], figures["n_samples"]) == (TEST, 2, 4)
    assert figures["iou"] > 0.7 and figures["iou_real_images"] > 0.7 and figures["iou_wrong_map"] < 0.1
    assert figures["diversity_l1"] > 0 and figures["sample_to_real_l1"] > 0
    assert json.loads((tmp_path / "seg.json").read_text()) == figures
    assert "iou_wrong_map" in capsys.readouterr().out


def test_superres_psnr_is_high_for_the_real_images_and_low_for_noise(tmp_path: Path, pairs: Path) -> None:
    names = sorted(p.stem for p in (pairs / "test" / "images").iterdir())
    reals = torch.stack([load_image(pairs / "test" / "images" / f"{n}.png", 32, 1) for n in names])
    save_images(reals, tmp_path / "exact", names=names)
    figures = superres_quality(tmp_path / "exact", pairs / "test", 4)
    assert figures["psnr_lowres"] > 40 and figures["psnr_full"] > 40 and figures["sample_to_real_l1"] == 0
    nudged = (reals + torch.where(torch.rand(reals.shape, generator=torch.Generator().manual_seed(0)) < 0.5, 1, -1)
              / 127.5).clamp(-1, 1)  # one gray level off
    save_images(torch.cat([reals, nudged]), tmp_path / "twice",
                names=[f"{n}_0" for n in names] + [f"{n}_1" for n in names])
    figures = superres_quality(tmp_path / "twice", pairs / "test", 4)
    assert figures["psnr_lowres"] > 40 and figures["n_conditions_with_several"] == TEST
    assert 0 < figures["diversity_l1"] < 0.01
    noise = torch.rand(reals.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    save_images(noise, tmp_path / "noise", names=names)
    figures = superres_quality(tmp_path / "noise", pairs / "test" / "images", 4)  # a plain image folder works too
    assert figures["psnr_lowres"] < 20 and figures["psnr_full"] < 10


def test_samples_are_matched_by_name_and_mixed_runs_refused(tmp_path: Path) -> None:
    image = torch.zeros(1, 1, 4, 4)
    save_images(image.expand(4, -1, -1, -1), tmp_path, names=["a_1", "a_0", "b", "grid"])
    assert sample_groups(tmp_path, {"a", "b", "c"}) == {"a": [tmp_path / "a_0.png", tmp_path / "a_1.png"],
                                                        "b": [tmp_path / "b.png"]}
    with pytest.raises(QualityError, match="no sample"):
        sample_groups(tmp_path, {"c"})
    save_images(image, tmp_path, names=["a"])
    with pytest.raises(QualityError, match="two runs"):
        sample_groups(tmp_path, {"a"})

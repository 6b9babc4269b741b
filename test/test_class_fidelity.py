"""The class-fidelity judge on a toy set whose answers are known, and its cache (``generate.py sample
--class-fidelity`` end to end is in test_generate.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import Dataset, TensorDataset

from dataloader import build_dataset, num_classes_of
from utils.config import DataConfig
from utils.evaluation.class_fidelity import (
    FidelityTally,
    JudgeSettings,
    cached_judge,
    nearest_distances,
    random_blur,
    train_judge,
)

CLASSES = 4
SIDE = 8
TOY = JudgeSettings(width=8, steps=60, batch_size=32, lr=1e-2)
CPU = torch.device("cpu")


def quadrants(count: int, seed: int) -> TensorDataset:
    """Noisy 8x8 gray images, dark but for one bright quadrant, the class (``i mod 4``) saying which."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % CLASSES
    images = -0.8 + 0.3 * torch.randn(count, 1, SIDE, SIDE, generator=generator)
    half = SIDE // 2
    for i, label in enumerate(labels.tolist()):
        row, column = divmod(label, 2)
        images[i, :, row * half:(row + 1) * half, column * half:(column + 1) * half] += 1.6
    return TensorDataset(images.clamp(-1, 1), labels)


@pytest.fixture(scope="module")
def judged() -> dict:
    return train_judge(quadrants(256, seed=0), quadrants(128, seed=1), CLASSES, 1, TOY, CPU)


def tally_of(state: dict, dataset: TensorDataset, labels: torch.Tensor) -> dict:
    tally = FidelityTally(state, CPU)
    images = dataset.tensors[0]
    for start in range(0, len(images), 50):
        tally.update(images[start:start + 50], labels[start:start + 50])
    return tally.result()


def test_the_judge_reads_the_toy_classes(judged: dict) -> None:
    assert judged["test_accuracy"] >= 0.95
    assert judged["n_test"] == 128 and judged["num_classes"] == CLASSES
    assert judged["train_features"].shape == (256, 4 * TOY.width)


def test_fidelity_counts_samples_of_the_class_asked_for(judged: dict) -> None:
    fresh = quadrants(100, seed=2)
    right = tally_of(judged, fresh, fresh.tensors[1])
    assert right["class_fidelity"] >= 0.95
    assert set(right["per_class_fidelity"]) == set(range(CLASSES))
    wrong = tally_of(judged, fresh, (fresh.tensors[1] + 1) % CLASSES)
    assert wrong["class_fidelity"] <= 0.05
    assert all(value <= 0.1 for value in wrong["per_class_fidelity"].values())
    only_zero = tally_of(judged, fresh, torch.zeros(100, dtype=torch.long))
    assert set(only_zero["per_class_fidelity"]) == {0}
    assert only_zero["class_fidelity"] == pytest.approx(0.25, abs=0.05)


def test_copies_of_training_images_are_near_copies_and_new_images_are_not(judged: dict) -> None:
    training = quadrants(256, seed=0)
    copies = tally_of(judged, training, training.tensors[1])
    assert copies["near_copy_rate"] == 1.0
    fresh = quadrants(200, seed=3)
    assert tally_of(judged, fresh, fresh.tensors[1])["near_copy_rate"] <= 0.2
    assert copies["near_copy_threshold"] == judged["copy_threshold"] > 0


def test_reconstructions_read_right_give_the_ceiling_of_class_fidelity(judged: dict) -> None:
    fresh = quadrants(100, seed=4)
    images, labels = fresh.tensors
    tally = FidelityTally(judged, CPU)
    tally.update(images, labels)
    assert "judge_reconstruction_accuracy" not in tally.result()
    tally.read_reconstructions([(images[:60], labels[:60]), (images[60:], labels[60:])])
    assert tally.result()["judge_reconstruction_accuracy"] >= 0.95
    tally.read_reconstructions([(images, (labels + 1) % CLASSES)])
    assert tally.result()["judge_reconstruction_accuracy"] <= 0.05


def test_random_blur_is_a_gaussian_of_its_own_sigma_for_each_image() -> None:
    images = torch.rand(3, 2, 16, 16)
    sigmas = torch.rand(3, generator=torch.Generator().manual_seed(7)) * 1.5
    blurred = random_blur(images, 1.5, torch.Generator().manual_seed(7))
    for image, sigma, result in zip(images, sigmas, blurred):
        expected = TF.gaussian_blur(image, kernel_size=7, sigma=sigma.item())
        torch.testing.assert_close(result[:, 3:-3, 3:-3], expected[:, 3:-3, 3:-3])  # the borders pad differently
    assert random_blur(images, 0.0, torch.Generator()) is images


def test_nearest_distances_agree_with_a_plain_search() -> None:
    features, bank = torch.randn(7, 5), torch.randn(10000, 5)
    plain = torch.stack([(bank - row).norm(dim=1).min() for row in features])
    torch.testing.assert_close(nearest_distances(features, bank.half()), plain, atol=2e-2, rtol=0)
    torch.testing.assert_close(nearest_distances(features, bank), plain)


def test_the_judge_is_trained_once_and_retrained_when_its_file_is_unreadable(tmp_path: Path) -> None:
    built: list[int] = []

    def datasets() -> tuple[Dataset, Dataset, int, int]:
        built.append(1)
        return quadrants(64, seed=0), quadrants(32, seed=1), CLASSES, 1

    path = tmp_path / "judge.pt"
    small = JudgeSettings(width=4, steps=5, batch_size=16)
    first = cached_judge(path, datasets, small, CPU)
    again = cached_judge(path, datasets, small, CPU)
    assert len(built) == 1 and again["copy_threshold"] == first["copy_threshold"]
    assert set(torch.load(path, weights_only=True)) == set(first)
    path.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="unreadable"):
        cached_judge(path, datasets, small, CPU)
    assert len(built) == 2


def test_the_judge_learns_a_class_folder(tmp_path: Path) -> None:
    """One subfolder per class (here a colour), read through the data config as training reads it."""
    rng = np.random.default_rng(0)
    for name, channel in (("red", 0), ("green", 1), ("blue", 2)):
        (tmp_path / name).mkdir()
        for i in range(24):
            pixels = rng.integers(0, 90, size=(12, 12, 3), dtype=np.uint8)
            pixels[..., channel] += 160
            Image.fromarray(pixels).save(tmp_path / name / f"{i}.png")
    data = DataConfig(name="folder", root=str(tmp_path), image_size=SIDE, class_labels=True, num_workers=0)
    train, test = build_dataset(data, "train"), build_dataset(data, "test")
    judged = train_judge(train, test, num_classes_of(train), 3, TOY, CPU)
    assert judged["num_classes"] == 3 and judged["n_test"] == len(test) > 0
    assert judged["test_accuracy"] == 1.0

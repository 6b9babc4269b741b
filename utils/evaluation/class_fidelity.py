"""Class fidelity: does a class-conditional prior draw the class it is asked for?

A small classifier, the *judge*, is trained once on the real training split of a labelled dataset. It then reads
generated images: the class fidelity of class ``c`` is the share of the samples asked for ``c`` that it reads as
``c`` (the classification accuracy score of generated images). Its accuracy on the real test split says how far to
trust it. Generated images are never sharper than the tokenizer's reconstructions, so the judge trains on real
images blurred by a random amount (``blur``): it learns to read the shape, not the crispness of its edges, and a
soft but clear cross still counts as a cross.

The judge's penultimate features (L2-normalised) also measure memorisation. Every real test image has a nearest
training image; the ``copy_quantile`` of those distances (5% by default) is the near-copy threshold. A sample
whose nearest training image is closer than that is a near copy: a prior that draws new images has a near-copy
rate close to ``copy_quantile``, one that recalls its training images a rate close to 1.

A judge is stored as a plain dict of tensors and numbers (read back with ``torch.load(weights_only=True)``): its
weights, its settings, the features of the training images and the test figures.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from utils.checkpoint import read_cached, save_checkpoint

NEAREST_CHUNK = 4096  # training features compared with a batch at once


@dataclass(frozen=True)
class JudgeSettings:
    """How the judge is built and trained; part of its cache key."""

    width: int = 32  # channels of the first of three conv stages (then 2x and 4x)
    steps: int = 600
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    copy_quantile: float = 0.05
    blur: float = 1.0  # each training image is blurred with a Gaussian of a sigma (pixels) drawn from [0, blur]


class ClassJudge(nn.Module):
    """Three conv-BN-ReLU-maxpool stages, global average pooling, a linear classifier."""

    def __init__(self, channels: int, num_classes: int, width: int) -> None:
        super().__init__()
        stages, inputs = [], channels
        for mult in (1, 2, 4):
            stages += [nn.Conv2d(inputs, width * mult, 3, padding=1, bias=False), nn.BatchNorm2d(width * mult),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            inputs = width * mult
        self.body = nn.Sequential(*stages)
        self.head = nn.Linear(inputs, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(images).mean(dim=(2, 3)))

    @torch.no_grad()
    def read(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted classes [N], normalised features [N, D]) of images [N, C, H, W] in [-1, 1]."""
        pooled = self.body(images).mean(dim=(2, 3))
        return self.head(pooled).argmax(dim=1), F.normalize(pooled, dim=1)


def _images_and_labels(batch: list | tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """The (image, label) of a batch of (image, label) or (image, condition, label) items."""
    return batch[0], torch.as_tensor(batch[-1])


def random_blur(images: torch.Tensor, max_sigma: float, generator: torch.Generator) -> torch.Tensor:
    """``images`` [N, C, H, W], each blurred by a Gaussian of its own sigma, uniform in [0, max_sigma] pixels."""
    if max_sigma <= 0:
        return images
    n, c, h, w = images.shape
    radius = math.ceil(2 * max_sigma)
    sigma = (torch.rand(n, generator=generator) * max_sigma).clamp(min=1e-3)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernels = torch.exp(-0.5 * (offsets / sigma[:, None]) ** 2)
    kernels = (kernels / kernels.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0).to(images)
    flat = images.reshape(1, n * c, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kernels[:, None, None, :], groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), kernels[:, None, :, None], groups=n * c)
    return flat.reshape(n, c, h, w)


def _train(model: ClassJudge, train_set: Dataset, settings: JudgeSettings, device: torch.device,
           num_workers: int) -> None:
    generator = torch.Generator().manual_seed(settings.seed)
    loader = DataLoader(train_set, batch_size=settings.batch_size, shuffle=True, drop_last=len(train_set) >
                        settings.batch_size, num_workers=num_workers, generator=generator)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr, total_steps=settings.steps)
    model.train()
    step = 0
    with tqdm(total=settings.steps, desc="training the class judge", dynamic_ncols=True) as progress:
        while step < settings.steps:
            for batch in loader:
                images, labels = _images_and_labels(batch)
                images = random_blur(images.to(device), settings.blur, generator)
                loss = F.cross_entropy(model(images), labels.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                progress.update()
                progress.set_postfix(loss=f"{loss.item():.3f}")
                if step == settings.steps:
                    break
    model.eval()


def _read_all(model: ClassJudge, dataset: Dataset, batch_size: int, device: torch.device,
              num_workers: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(predictions, features, true labels) of every item of ``dataset``, in order."""
    predictions, features, labels = [], [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers):
        images, true = _images_and_labels(batch)
        predicted, feature = model.read(images.to(device))
        predictions.append(predicted.cpu())
        features.append(feature.cpu())
        labels.append(true)
    return torch.cat(predictions), torch.cat(features), torch.cat(labels)


def nearest_distances(features: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Euclidean distance [N] from each row of ``features`` [N, D] to its nearest row of ``bank`` [M, D]."""
    nearest = torch.full((len(features),), float("inf"))
    features = features.float()
    for start in range(0, len(bank), NEAREST_CHUNK):
        chunk = bank[start:start + NEAREST_CHUNK].to(features.device, torch.float32)
        nearest = torch.minimum(nearest, torch.cdist(features, chunk).min(dim=1).values.cpu())
    return nearest


def train_judge(train_set: Dataset, test_set: Dataset, num_classes: int, channels: int, settings: JudgeSettings,
                device: torch.device, num_workers: int = 0) -> dict:
    """Train a judge on ``train_set`` and measure it on ``test_set``: the dict :func:`load_judge` reads."""
    if num_classes < 2:
        raise ValueError(f"class fidelity needs a dataset with at least 2 classes, got {num_classes}.")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad():
        torch.manual_seed(settings.seed)
        model = ClassJudge(channels, num_classes, settings.width).to(device)
        _train(model, train_set, settings, device, num_workers)
    _, train_features, _ = _read_all(model, train_set, settings.batch_size, device, num_workers)
    predicted, test_features, test_labels = _read_all(model, test_set, settings.batch_size, device, num_workers)
    test_nearest = nearest_distances(test_features.to(device), train_features)
    return {"model": {k: v.cpu() for k, v in model.state_dict().items()}, "settings": asdict(settings),
            "channels": channels, "num_classes": num_classes,
            "train_features": train_features.half(),
            "test_accuracy": (predicted == test_labels).float().mean().item(),
            "n_test": len(test_labels),
            "copy_threshold": torch.quantile(test_nearest, settings.copy_quantile).item()}


def load_judge(state: dict, device: torch.device) -> ClassJudge:
    """The judge (in eval mode on ``device``) of a dict made by :func:`train_judge`."""
    model = ClassJudge(state["channels"], state["num_classes"], state["settings"]["width"])
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def cached_judge(path: str | Path, make_datasets: Callable[[], tuple[Dataset, Dataset, int, int]],
                 settings: JudgeSettings, device: torch.device, num_workers: int = 0) -> dict:
    """The judge stored at ``path``; otherwise one trained on the (train set, test set, number of classes,
    channels) that ``make_datasets`` builds, and stored there."""
    path = Path(path)
    cached = read_cached(path, "class judge", "training it")
    if cached is not None:
        return cached
    train_set, test_set, num_classes, channels = make_datasets()
    state = train_judge(train_set, test_set, num_classes, channels, settings, device, num_workers)
    save_checkpoint(state, path)
    return state


class FidelityTally:
    """Reads batches of samples with the judge and sums up, per requested class, how many it read as that class,
    and how many were near copies of a training image."""

    def __init__(self, state: dict, device: torch.device) -> None:
        self.judge = load_judge(state, device)
        self.bank = state["train_features"].to(device)
        self.state = state
        self.device = device
        self.requested: list[torch.Tensor] = []
        self.predicted: list[torch.Tensor] = []
        self.nearest: list[torch.Tensor] = []
        self.reconstruction_accuracy: float | None = None

    def update(self, images: torch.Tensor, requested: torch.Tensor) -> None:
        """Judge samples [N, C, H, W] in [-1, 1] that were asked for classes ``requested`` [N]."""
        predicted, features = self.judge.read(images.to(self.device, torch.float32))
        self.requested.append(requested.cpu())
        self.predicted.append(predicted.cpu())
        self.nearest.append(nearest_distances(features, self.bank))

    def read_reconstructions(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Judge the tokenizer's reconstructions of real images, batches of (images [N, C, H, W] in [-1, 1], true
        labels [N]). Their accuracy is the ceiling of class fidelity: a prior can draw its classes no more clearly
        than its tokenizer can reproduce real ones."""
        hits, total = 0, 0
        for images, labels in batches:
            predicted, _ = self.judge.read(images.to(self.device, torch.float32))
            hits += (predicted.cpu() == labels.cpu()).sum().item()
            total += len(labels)
        self.reconstruction_accuracy = hits / total

    def result(self) -> dict:
        """Class fidelity (all samples and per class), near-copy rate and the judge's own figures."""
        requested, predicted = torch.cat(self.requested), torch.cat(self.predicted)
        hits = (requested == predicted).float()
        per_class = {int(c): round(hits[requested == c].mean().item(), 4) for c in requested.unique()}
        return {"class_fidelity": hits.mean().item(), "per_class_fidelity": per_class,
                "near_copy_rate": (torch.cat(self.nearest) < self.state["copy_threshold"]).float().mean().item(),
                "near_copy_threshold": self.state["copy_threshold"],
                "judge_test_accuracy": self.state["test_accuracy"], "judge_n_test": self.state["n_test"],
                **({} if self.reconstruction_accuracy is None else
                   {"judge_reconstruction_accuracy": self.reconstruction_accuracy})}

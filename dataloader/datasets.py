"""Build the dataset a ``DataConfig`` asks for, and tell how many classes a dataset has.

Every item is ``(image, label)``: a float tensor [C,H,W] in [-1, 1] with C = ``channels`` and
H = W = ``image_size``, and an int label (0 for datasets without classes).
"""

from torch.utils.data import Dataset, Subset

from utils.config import DataConfig, validate_data

from .builtin import ShapesDataset
from .folder import load_folder
from .standard import load_cifar10, load_idx_dataset

SPLITS = ("train", "test")
BUILTIN_SEEDS = {"train": 0, "test": 1}
NAMES = ("builtin", "mnist", "fashion_mnist", "cifar10", "folder")


def build_dataset(cfg: DataConfig, split: str = "train", augment: bool | None = None) -> Dataset:
    """The ``split`` ('train' or 'test') of the dataset ``cfg.name``.

    ``augment`` (random horizontal flips) defaults to ``cfg.random_flip`` on the train split only.
    Builtin: ``num_samples`` train items and ``eval_samples`` test items (10% of ``num_samples`` when
    0), drawn from different seeds. Standard sets: the whole train split, and the first ``eval_samples``
    test images (0 = all). Folders: see ``dataloader.folder``.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    validate_data(cfg)
    if augment is None:
        augment = cfg.random_flip and split == "train"
    if cfg.name == "builtin":
        length = cfg.num_samples if split == "train" else cfg.eval_samples or max(1, cfg.num_samples // 10)
        return ShapesDataset(length, cfg.image_size, cfg.channels, cfg.num_classes, BUILTIN_SEEDS[split], augment)
    if cfg.name in ("mnist", "fashion_mnist"):
        return load_idx_dataset(cfg.name, cfg.root, split, cfg.image_size, cfg.channels, cfg.download,
                                cfg.eval_samples, augment)
    if cfg.name == "cifar10":
        return load_cifar10(cfg.root, split, cfg.image_size, cfg.channels, cfg.download, cfg.eval_samples, augment)
    if cfg.name == "folder":
        return load_folder(cfg.root, split, cfg.image_size, cfg.channels, cfg.class_labels, cfg.eval_samples,
                           augment, cfg.skip_bad_images)
    raise ValueError(f"unknown data.name {cfg.name!r}; choose one of {', '.join(NAMES)}.")


def num_classes_of(dataset: Dataset) -> int:
    """Number of classes of a dataset built here (looking through ``Subset``); 0 when it has none."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return int(getattr(dataset, "num_classes", 0))

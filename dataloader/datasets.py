"""Build the dataset a ``DataConfig`` asks for, tell how many classes a dataset has and which settings identify it.

Without a condition every item is ``(image, label)``: a float tensor [C,H,W] in [-1, 1] with C =
``channels`` and H = W = ``image_size`` (``crop_size`` when set), and an int label (0 for datasets without
classes). With ``data.condition`` items are ``(image, condition, label)``, and with ``data.content: conditions``
``(condition, label)``. The condition map is at ``image_size``, cropped and flipped with its image:
segmentation a long [1,H,W] label map (values 0..num_labels-1, not one-hot), depth a float [1,H,W] in
[-1, 1], lowres a float [C,H,W] (``transforms.lowres_condition``), coord a float [1,H,W] in [0, 1)
(``transforms.coord_map``, never flipped).
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, Subset

from utils.config import DataConfig, is_cropped, to_dict, validate_data

from .builtin import RENDER_VERSION, ShapesDataset
from .conditions import ConditionsOnly, DerivedConditions, ImagesOnly
from .crops import Crops
from .errors import DatasetFormatError
from .folder import folder_fingerprint, load_folder
from .paired import CONDITION_KINDS, has_condition_maps, load_paired
from .standard import load_cifar10, load_idx_dataset

SPLITS = ("train", "test")
BUILTIN_SEEDS = {"train": 0, "test": 1}
NAMES = ("builtin", "mnist", "fashion_mnist", "cifar10", "folder")


def build_dataset(cfg: DataConfig, split: str = "train", augment: bool | None = None) -> Dataset:
    """The ``split`` ('train' or 'test') of the dataset ``cfg.name``, with the items the module docstring lists.

    ``augment`` (random horizontal flips) defaults to ``cfg.random_flip`` on the train split only. With
    ``cfg.crop_size`` every item is cropped after its conditions are derived (so coordinates are positions in the
    whole image): at random on the train split, in the centre on the test split.
    Builtin: ``num_samples`` train items and ``eval_samples`` test items (10% of ``num_samples`` when
    0), drawn from different seeds. Standard sets: the whole train split, and the first ``eval_samples``
    test images (0 = all). Folders: see ``dataloader.folder``, and ``dataloader.paired`` for
    segmentation and depth conditions.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    validate_data(cfg)
    if augment is None:
        augment = cfg.random_flip and split == "train"
    dataset = _images(cfg, split, augment)
    if cfg.condition in ("lowres", "coord"):
        dataset = DerivedConditions(dataset, cfg.condition, cfg.lowres_factor)
    if is_cropped(cfg):
        dataset = Crops(dataset, cfg.crop_size, random=split == "train")
    if cfg.content == "conditions":
        dataset = ConditionsOnly(dataset)
    return dataset


def _images(cfg: DataConfig, split: str, augment: bool) -> Dataset:
    """The dataset before derived conditions: (image, label) items, or (image, condition, label) where the
    condition maps come with the data."""
    if cfg.name == "builtin":
        length = cfg.num_samples if split == "train" else cfg.eval_samples or max(1, cfg.num_samples // 10)
        return ShapesDataset(length, cfg.image_size, cfg.channels, cfg.num_classes, BUILTIN_SEEDS[split], augment,
                             segmentation=cfg.condition == "segmentation", scene=cfg.scene)
    if cfg.name in ("mnist", "fashion_mnist"):
        return load_idx_dataset(cfg.name, cfg.root, split, cfg.image_size, cfg.channels, cfg.download,
                                cfg.eval_samples, augment)
    if cfg.name == "cifar10":
        return load_cifar10(cfg.root, split, cfg.image_size, cfg.channels, cfg.download, cfg.eval_samples, augment)
    if cfg.name == "folder":
        if cfg.condition in CONDITION_KINDS:
            return load_paired(cfg.root, split, cfg.condition, cfg.image_size, cfg.channels, cfg.num_labels,
                               cfg.eval_samples, augment, cfg.skip_bad_images)
        if has_condition_maps(Path(cfg.root)):
            raise DatasetFormatError(
                f"'{cfg.root}' holds condition maps (a conditions/ folder beside images/), which a plain image folder "
                f"would read as images. Set data.condition to segmentation or depth to read the pairs (the images "
                f"come first in each item), or point data.root at a folder of images only.")
        return load_folder(cfg.root, split, cfg.image_size, cfg.channels, cfg.class_labels, cfg.eval_samples,
                           augment, cfg.skip_bad_images)
    raise ValueError(f"unknown data.name {cfg.name!r}; choose one of {', '.join(NAMES)}.")


def _base(dataset: Dataset) -> Dataset:
    """The dataset under ``Subset`` and the condition and crop views."""
    while isinstance(dataset, (Subset, DerivedConditions, ConditionsOnly, ImagesOnly, Crops)):
        dataset = dataset.dataset
    return dataset


def num_classes_of(dataset: Dataset) -> int:
    """Number of classes of a dataset built here (looking through ``Subset`` and the condition views); 0 when it
    has none."""
    return int(getattr(_base(dataset), "num_classes", 0))


def class_names_of(dataset: Dataset) -> list[str]:
    """The names of the classes of a dataset built here (its class ids as text where it has no names)."""
    base = _base(dataset)
    return list(getattr(base, "class_names", None) or map(str, range(num_classes_of(base))))


def data_settings(data: DataConfig, ignore: Sequence[str] = ()) -> dict[str, Any]:
    """The data settings that change what a cached result is computed from (all but ``num_workers`` and the
    ``ignore`` keys), plus, for an image folder, the names, sizes and modification times of its files (so that
    edited images count as new data), and for the built-in data the version of its renderer."""
    settings = {k: v for k, v in to_dict(data).items() if k != "num_workers" and k not in ignore}
    if data.name == "builtin":
        settings["render_version"] = RENDER_VERSION
    if data.name == "folder" and Path(data.root).is_dir():
        settings["files"] = folder_fingerprint(data.root)
    return settings

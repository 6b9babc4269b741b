"""The image sets ``generate.py`` reads: a folder of images, a YAML config, or a checkpoint's own data; and the
folders of condition maps it samples from.

An input spec is one of

* ``test``: the test split of the data the checkpoint was trained on (its stored config);
* a ``.yaml``/``.yml`` file: the test split of the dataset its ``data`` section describes (a stage-1
  or stage-2 config; the other sections are ignored);
* a folder: every image under it (recursive, sorted by path), without labels.

Images always come at the model's resolution and channel count (resized and center-cropped, RGB
reduced to luma or grayscale repeated), whatever the config or the files say.

A condition folder (:func:`condition_folder`) holds the maps to sample from: the files under
``ROOT/conditions/`` when it exists, each with its real image ``ROOT/images/`` of the same name where
there is one; otherwise every image file under ``ROOT``, without real images. Segmentation and depth
maps are read as in ``dataloader.paired``. Lowres maps are low-resolution images of any size, cropped
to ``image_size // lowres_factor`` and upsampled to ``image_size`` (bicubic), the form
``transforms.lowres_condition`` gives; a folder with ``images/`` but no ``conditions/`` derives them
from its images. Coordinate maps are computed, never read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch.utils.data import Dataset, Subset

from utils.config import ConfigError, DataConfig, from_dict, parse_yaml

from .datasets import build_dataset, num_classes_of
from .errors import DatasetFormatError, DatasetNotFoundError
from .folder import EXTENSIONS, FolderDataset, image_tensor, list_images, load_image, open_image
from .loader import CheckedLoader
from .paired import CONDITIONS, IMAGES, by_stem, check_sizes, condition_tensor, open_condition
from .transforms import lowres_condition, upsample

OWN_TEST_SPLIT = "test"
CONFIG_SUFFIXES = (".yaml", ".yml")


@dataclass
class _DataSection:
    """A config of the ``data`` section alone (what an input spec needs of a stage-1 or stage-2 config)."""

    data: DataConfig = dataclasses.field(default_factory=DataConfig)


@dataclass
class ImageSet:
    """A dataset of (image, label) items plus how to load it and how to name it to the user."""

    dataset: Dataset
    description: str
    num_workers: int = 0

    @property
    def num_classes(self) -> int:
        return num_classes_of(self.dataset)

    def loader(self, batch_size: int) -> CheckedLoader:
        """Batches in order (no shuffling), so outputs line up with the inputs."""
        return CheckedLoader(self.dataset, batch_size=batch_size, shuffle=False, num_workers=self.num_workers)


def data_config_of(config: dict) -> DataConfig:
    """The ``data`` section of a resolved config dict (stage 1 or stage 2, as stored in checkpoints)."""
    return from_dict(_DataSection, {"data": config.get("data") or {}}).data


def read_data_section(path: Path) -> DataConfig:
    """The ``data`` section of a YAML config file, validated."""
    try:
        raw = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML: {err}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file '{path}' cannot be read ({err}). Pass a YAML text file.") from err
    if not isinstance(raw, dict) or "data" not in raw:
        raise ConfigError(f"config file '{path}' has no 'data' section, so it does not say which images to use.")
    return data_config_of(raw)


def folder_images(root: Path, image_size: int, channels: int) -> FolderDataset:
    """Every image under ``root`` (label 0), converted to ``image_size`` and ``channels``."""
    if not root.is_dir():
        raise DatasetNotFoundError(f"input folder '{root}' does not exist. Pass a folder of images, a YAML config "
                                   f"(its data section, test split) or 'test' (the checkpoint's own test split).")
    paths = list_images(root)
    if not paths:
        raise DatasetNotFoundError(f"no images found in '{root}' (searched recursively for {', '.join(EXTENSIONS)}).")
    return FolderDataset(paths, [0] * len(paths), [], image_size, channels, root=root)


def resolve_images(spec: str, trained_on: DataConfig, *, image_size: int, channels: int,
                   limit: int | None = None) -> ImageSet:
    """The images ``spec`` names (see the module docstring); the first ``limit`` of them when given."""
    path = Path(spec)
    if spec == OWN_TEST_SPLIT:
        data = dataclasses.replace(trained_on, image_size=image_size, channels=channels)
        image_set = ImageSet(build_dataset(data, "test", augment=False),
                             f"test split of the training data ({data.name})", data.num_workers)
    elif path.suffix.lower() in CONFIG_SUFFIXES:
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist.")
        data = dataclasses.replace(read_data_section(path), image_size=image_size, channels=channels)
        image_set = ImageSet(build_dataset(data, "test", augment=False), f"test split of {path} ({data.name})",
                             data.num_workers)
    elif path.is_file():
        raise DatasetNotFoundError(f"input '{path}' is a file but not a YAML config. Pass a folder of images, "
                                   f"a YAML config (.yaml) or 'test' (the checkpoint's own test split).")
    else:
        image_set = ImageSet(folder_images(path, image_size, channels), f"folder {path}")
    if limit is not None and limit < len(image_set.dataset):
        image_set.dataset = Subset(image_set.dataset, range(limit))
        image_set.description += f", first {limit} images"
    return image_set


class ConditionSet(Dataset):
    """Condition maps to sample from; items ``(condition, image, has_image)`` with the condition in the form
    ``build_dataset`` gives and the real image (zeros where there is none). A condition path of None means the
    map is derived from the image (lowres). ``stems`` names each map (its relative path without extension)."""

    def __init__(self, conditions: list[Path | None], images: list[Path | None], stems: list[str], kind: str,
                 image_size: int, channels: int, num_labels: int = 0, lowres_factor: int = 4,
                 description: str = "") -> None:
        if not len(conditions) == len(images) == len(stems):
            raise ValueError(f"{len(conditions)} conditions, {len(images)} images and {len(stems)} stems.")
        self.conditions = conditions
        self.images = images
        self.stems = stems
        self.kind = kind
        self.image_size = image_size
        self.channels = channels
        self.num_labels = num_labels
        self.lowres_factor = lowres_factor
        self.description = description

    def __len__(self) -> int:
        return len(self.stems)

    def __repr__(self) -> str:
        return f"ConditionSet({self.description})"

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        condition_path, image_path = self.conditions[index], self.images[index]
        if condition_path is None:
            image = load_image(image_path, self.image_size, self.channels)
            return lowres_condition(image, self.lowres_factor), image, True
        if self.kind == "lowres":
            small = self.image_size // self.lowres_factor
            condition = upsample(image_tensor(open_image(condition_path, small), small, self.channels),
                                 self.image_size, self.image_size)
            image = None if image_path is None else load_image(image_path, self.image_size, self.channels)
        else:
            opened = open_condition(condition_path, self.kind, self.num_labels)
            image = None
            if image_path is not None:
                real = open_image(image_path)
                check_sizes(real, image_path, opened, condition_path)
                image = image_tensor(real, self.image_size, self.channels)
            condition = condition_tensor(opened, self.kind, self.image_size)
        if image is None:
            return condition, torch.zeros(self.channels, self.image_size, self.image_size), False
        return condition, image, True


def condition_folder(root: str | Path, kind: str, image_size: int, channels: int, num_labels: int = 0,
                     lowres_factor: int = 4) -> ConditionSet:
    """The condition maps of ``kind`` (segmentation, depth or lowres) under ``root``, by the rules of the module
    docstring, sorted by path."""
    root = Path(root)
    if kind == "coord":
        raise DatasetFormatError(f"coordinate conditions are computed from the pixel positions, not read from files "
                                 f"such as those in '{root}': sample without --condition.")
    if kind not in ("segmentation", "depth", "lowres"):
        raise ValueError(f"kind must be segmentation, depth, lowres or coord, got {kind!r}.")
    if kind == "lowres" and (lowres_factor < 1 or image_size % lowres_factor):
        raise ValueError(f"image_size {image_size} is not divisible by lowres_factor {lowres_factor}.")
    if not root.is_dir():
        raise DatasetNotFoundError(f"condition folder '{root}' does not exist (or is not a folder). Pass a folder of "
                                   f"{kind} maps, or one with conditions/ (the maps) and images/ (their images).")
    images_dir, conditions_dir = root / IMAGES, root / CONDITIONS
    real = by_stem(list_images(images_dir), images_dir) if images_dir.is_dir() else {}
    if conditions_dir.is_dir():
        found = by_stem(list_images(conditions_dir), conditions_dir)
        stems = sorted(found)
        conditions, images, folder = [found[s] for s in stems], [real.get(s) for s in stems], conditions_dir
    elif kind == "lowres" and real:
        stems = sorted(real)
        conditions, images, folder = [None] * len(stems), [real[s] for s in stems], images_dir
    else:
        found = by_stem(list_images(root), root)
        stems = sorted(found)
        conditions, images, folder = [found[s] for s in stems], [None] * len(stems), root
    if not stems:
        raise DatasetNotFoundError(f"no condition maps found in '{folder}' (searched recursively for "
                                   f"{', '.join(EXTENSIONS)}). Pass a folder of {kind} maps.")
    paired = sum(image is not None for image in images)
    if conditions[0] is None:
        description = f"{len(stems)} {kind} maps derived from the images in {folder}"
    else:
        description = f"{len(stems)} {kind} maps in {folder}" + (f", {paired} with their images" if paired else "")
    return ConditionSet(conditions, images, stems, kind, image_size, channels, num_labels, lowres_factor,
                        description)

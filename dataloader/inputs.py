"""The image sets ``generate.py`` reads: a folder of images, a YAML config, or a checkpoint's own data.

An input spec is one of

* ``test``: the test split of the data the checkpoint was trained on (its stored config);
* a ``.yaml``/``.yml`` file: the test split of the dataset its ``data`` section describes (a stage-1
  or stage-2 config; the other sections are ignored);
* a folder: every image under it (recursive, sorted by path), without labels.

Images always come at the model's resolution and channel count (resized and center-cropped, RGB
reduced to luma or grayscale repeated), whatever the config or the files say.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml
from torch.utils.data import Dataset, Subset

from utils.config import ConfigError, DataConfig, from_dict, parse_yaml

from .datasets import build_dataset, num_classes_of
from .errors import DatasetNotFoundError
from .folder import EXTENSIONS, FolderDataset, list_images
from .loader import CheckedLoader

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

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
from its images (for segmentation and depth such a folder is an error). Coordinate maps are computed, never
read.

Conditional sampling and completion read their inputs through :func:`conditioned_inputs`: every input as
(image, condition, label, has_image), with the condition map a prior of a given kind takes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch.utils.data import Dataset, Subset

from utils.config import ConfigError, DataConfig, from_dict, parse_yaml

from .conditions import DerivedConditions, ImagesOnly
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


def at_size(data: DataConfig, image_size: int, channels: int) -> DataConfig:
    """``data`` giving squares of ``image_size`` with ``channels``: its centre crops where a model trained on its crops
    of that size (``data.crop_size``), else its whole images resized."""
    if data.crop_size == image_size:
        return dataclasses.replace(data, channels=channels)
    return dataclasses.replace(data, image_size=image_size, crop_size=None, channels=channels)


def resolve_images(spec: str, trained_on: DataConfig, *, image_size: int, channels: int,
                   limit: int | None = None) -> ImageSet:
    """The images ``spec`` names (see the module docstring); the first ``limit`` of them when given."""
    path = Path(spec)
    if spec == OWN_TEST_SPLIT:
        data = at_size(trained_on, image_size, channels)
        image_set = ImageSet(_test_images(data), f"test split of the training data ({data.name})", data.num_workers)
    elif path.suffix.lower() in CONFIG_SUFFIXES:
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist.")
        data = at_size(read_data_section(path), image_size, channels)
        image_set = ImageSet(_test_images(data), f"test split of {path} ({data.name})", data.num_workers)
    elif path.is_file():
        raise DatasetNotFoundError(f"input '{path}' is a file but not a YAML config. Pass a folder of images, "
                                   f"a YAML config (.yaml) or 'test' (the checkpoint's own test split).")
    else:
        image_set = ImageSet(folder_images(path, image_size, channels), f"folder {path}")
    if limit is not None and limit < len(image_set.dataset):
        image_set.dataset = Subset(image_set.dataset, range(limit))
        image_set.description += f", first {limit} images"
    return image_set


def _test_images(data: DataConfig) -> Dataset:
    """The test split of ``data`` as (image, label) items: without the condition maps that come with its images."""
    dataset = build_dataset(data, "test", augment=False)
    return ImagesOnly(dataset) if data.condition != "none" and data.content == "images" else dataset


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
    elif images_dir.is_dir():
        raise DatasetNotFoundError(f"'{root}' has an images/ folder but no conditions/ folder, so it has no {kind} "
                                   f"maps: put the map of each image in {conditions_dir}/NAME.png (or pass a folder "
                                   f"of maps alone).")
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


class _ConditionedItems(Dataset):
    """Items (image, condition, label, has_image) from a dataset of (image, label) (no condition: a placeholder
    that collates), (image, condition, label) or (condition, image, has_image) items."""

    def __init__(self, base: Dataset, layout: str) -> None:
        self.base, self.layout = base, layout

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
        item = self.base[index]
        if self.layout == "conditions":
            condition, image, has_image = item
            return image, condition, 0, bool(has_image)
        if self.layout == "triples":
            image, condition, label = item
            return image, condition, label, True
        image, label = item
        return image, torch.zeros(1), label, True


@dataclass
class ConditionedInputs:
    """Inputs of conditional sampling and completion: (image, condition, label, has_image) items and their names."""

    dataset: Dataset
    names: list[str]
    description: str
    num_classes: int
    num_labels: int
    num_workers: int = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                         list[str]]]:
        """(images, conditions, labels, has_image, names) in order, ``batch_size`` inputs at a time."""
        loader = CheckedLoader(self.dataset, batch_size=batch_size, shuffle=False, num_workers=self.num_workers)
        for start, (images, conditions, labels, has_image) in zip(range(0, len(self), batch_size), loader):
            yield images, conditions, labels, has_image, self.names[start:start + len(images)]


def conditioned_inputs(spec: str, trained_on: DataConfig, kind: str, *, image_size: int, channels: int,
                       limit: int | None = None, need_images: bool = False) -> ConditionedInputs:
    """The inputs ``spec`` names with the condition a prior conditioned on ``kind`` takes (none, class, segmentation,
    depth, lowres or coord): ``test`` or a YAML config (their test split, with the condition maps of ``kind``), or a
    folder (see :func:`condition_folder`; with ``need_images`` a plain folder holds the images, whose low-res or
    coordinate conditions are derived). The first ``limit`` of them when given."""
    path = Path(spec)
    derive = kind if kind in ("lowres", "coord") else "none"
    factor = trained_on.lowres_factor
    if spec == OWN_TEST_SPLIT or path.suffix.lower() in CONFIG_SUFFIXES:
        data = trained_on if spec == OWN_TEST_SPLIT else _config_data(path)
        if kind in ("segmentation", "depth", "lowres", "coord") and data.condition != kind:
            raise ConfigError(f"{spec}: its data gives {data.condition} condition maps, but the prior is conditioned "
                              f"on {kind}; pass data with data.condition={kind}.")
        data = dataclasses.replace(at_size(data, image_size, channels), content="images")
        base = build_dataset(data, "test", augment=False)
        layout = "pairs" if data.condition == "none" else "triples"
        items = _ConditionedItems(base, layout)
        where = "test split of the training data" if spec == OWN_TEST_SPLIT else f"test split of {path}"
        names = [f"{i:06d}" for i in range(len(base))]
        inputs = ConditionedInputs(items, names, f"{where} ({data.name})", num_classes_of(base), data.num_labels,
                                   data.num_workers)
    elif path.is_file():
        raise DatasetNotFoundError(f"input '{path}' is a file but not a YAML config. Pass a folder, a YAML config "
                                   f"(.yaml) or 'test' (the checkpoint's own test split).")
    elif kind in ("segmentation", "depth") or (kind == "lowres" and not (need_images and _plain(path))):
        found = condition_folder(path, kind, image_size, channels, trained_on.num_labels, factor)
        if need_images:
            _check_images(found, path)
        inputs = ConditionedInputs(_ConditionedItems(found, "conditions"), list(found.stems), found.description, 0,
                                   trained_on.num_labels)
    else:
        if kind == "coord" and not need_images:
            raise DatasetFormatError("coordinate conditions are computed, not read from files: sample without "
                                     "--condition.")
        images = folder_images(path, image_size, channels)
        names = [str(p.relative_to(path).with_suffix("")) for p in images.paths]
        if derive == "none":
            items = _ConditionedItems(images, "pairs")
        else:
            items = _ConditionedItems(DerivedConditions(images, derive, factor), "triples")
        inputs = ConditionedInputs(items, names, f"folder {path}", 0,
                                   trained_on.num_labels)
    if limit is not None and limit < len(inputs):
        inputs.dataset, inputs.names = Subset(inputs.dataset, range(limit)), inputs.names[:limit]
        inputs.description += f", first {limit}"
    return inputs


def _config_data(path: Path) -> DataConfig:
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist.")
    return read_data_section(path)


def _plain(root: Path) -> bool:
    """A folder without the paired layout (no conditions/ and no images/ subfolder)."""
    return not (root / "conditions").is_dir() and not (root / "images").is_dir()


def _check_images(found: ConditionSet, root: Path) -> None:
    missing = [stem for stem, image in zip(found.stems, found.images) if image is None]
    if missing:
        raise DatasetFormatError(f"completion needs the image of every condition, but {len(missing)} condition map(s) "
                                 f"in '{root}' have none in '{root / 'images'}': {', '.join(missing[:5])}"
                                 f"{' ...' if len(missing) > 5 else ''}. Add the images, or remove those maps.")

"""Paired folders: every image comes with a condition map of the same name (segmentation labels or depth).

Layout: ``ROOT/images/NAME.ext`` and ``ROOT/conditions/NAME.png``, paired by their path relative to
``images/`` and ``conditions/`` without the extension (subfolders allowed; a condition map may have
any extension of ``dataloader.folder.EXTENSIONS``, PNG is the documented one). When ``ROOT`` holds
``train/`` and ``test/`` (or ``val/``) folders, each holds its own ``images/`` and ``conditions/``;
otherwise the test split is held out as in ``dataloader.folder``. There are no class labels.

Images are read, converted and cropped as folder images. A segmentation map is an 8-bit single-channel
image (mode L, or P whose palette indices are the labels) whose pixel values are the labels
0..num_labels-1; it becomes a long [1,H,W] tensor, resized and cropped like its image but with nearest
resampling. A depth map is an 8-bit (scaled by 255) or 16-bit (scaled by 65535) single-channel image;
it becomes a float [1,H,W] tensor in [-1, 1], resized bilinear. A map is flipped with its image.

When the dataset is built: both folders exist and every image has a map and every map an image. When
an item is loaded: the map is single-channel, its labels (the original pixels, before resizing) are in
range, and it has its image's size (after the image's EXIF rotation). An unreadable image or map raises
``BadImageError`` naming the file; with ``skip_bad_images`` the pair is skipped like an unreadable
folder image.
"""

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from .errors import DatasetFormatError, DatasetNotFoundError
from .folder import (
    FolderDataset,
    image_tensor,
    list_images,
    listed,
    open_image,
    resize_center_crop,
    split_dirs,
    split_items,
)
from .transforms import random_hflip_pair

ConditionKind = Literal["segmentation", "depth"]
CONDITION_KINDS = ("segmentation", "depth")
IMAGES, CONDITIONS = "images", "conditions"
_DEPTH_SCALES = {"L": 255.0, "I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0}
_SHOWN = 5  # names listed in an error about unpaired files


def by_stem(paths: list[Path], base: Path) -> dict[str, Path]:
    """``paths`` keyed by their path relative to ``base`` without the extension; two files with one key are an
    error."""
    found: dict[str, Path] = {}
    for path in paths:
        stem = path.relative_to(base).with_suffix("").as_posix()
        if stem in found:
            raise DatasetFormatError(f"'{found[stem]}' and '{path}' differ only in their extension, so it is unclear "
                                     f"which one pairs with the other folder's '{stem}'. Rename or remove one.")
        found[stem] = path
    return found


def _unpaired(names: list[str], what: str, where: Path, partner: Path) -> str:
    shown = ", ".join(names[:_SHOWN]) + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")
    return f"{len(names)} {what} in '{where}' have no partner of the same name in '{partner}': {shown}."


def pair_up(folder: Path) -> list[tuple[Path, Path]]:
    """The (image, condition map) pairs of ``folder``/images and ``folder``/conditions, sorted by image path."""
    images_dir, conditions_dir = folder / IMAGES, folder / CONDITIONS
    for directory, what in ((images_dir, "the images"), (conditions_dir, "their condition maps")):
        if not directory.is_dir():
            raise DatasetNotFoundError(
                f"'{folder}' has no {directory.name}/ folder. Segmentation and depth conditions read pairs: "
                f"{images_dir}/NAME.ext (the images) and {conditions_dir}/NAME.png (their maps); add {what} there, "
                f"or set data.condition to lowres, coord or none to read a plain image folder.")
    images = by_stem(listed(images_dir), images_dir)
    conditions = by_stem(list_images(conditions_dir), conditions_dir)
    problems = []
    if lonely := sorted(set(images) - set(conditions)):
        problems.append(_unpaired([images[s].name for s in lonely], "image(s)", images_dir, conditions_dir))
    if lonely := sorted(set(conditions) - set(images)):
        problems.append(_unpaired([conditions[s].name for s in lonely], "condition map(s)", conditions_dir,
                                  images_dir))
    if problems:
        raise DatasetFormatError(" ".join(problems) + f" Every {images_dir}/NAME.ext needs a map {conditions_dir}/"
                                 f"NAME.png with the same relative path and name: add the missing files or remove "
                                 f"the unpaired ones.")
    return sorted((images[stem], conditions[stem]) for stem in images)


def has_condition_maps(root: Path) -> bool:
    """True when ``root`` (or one of its split folders) holds images/ and conditions/ folders."""
    folders = split_dirs(root) or (root,)
    return any((folder / IMAGES).is_dir() and (folder / CONDITIONS).is_dir() for folder in folders)


def open_condition(path: Path, kind: ConditionKind, num_labels: int) -> Image.Image:
    """Decode and check one condition map at its own size: a segmentation map as it is (labels checked against
    ``num_labels``), a depth map as a float ('F') image in [-1, 1]."""
    image = open_image(path)
    if kind == "segmentation":
        if image.mode not in ("L", "P"):
            raise DatasetFormatError(
                f"condition map '{path}' is a {image.mode} image ({len(image.getbands())} channel(s)), but a "
                f"segmentation map must be 8-bit single-channel. Save the label indices as an 8-bit grayscale PNG "
                f"(pixel value = label; a palette PNG's indices work too), not as colours.")
        found = int(np.asarray(image).max())
        if found >= num_labels:
            raise DatasetFormatError(
                f"condition map '{path}' holds label {found}, but data.num_labels is {num_labels} (labels 0.."
                f"{num_labels - 1}). Set data.num_labels to at least {found + 1}, or fix the map.")
        return image
    if image.mode not in _DEPTH_SCALES:
        raise DatasetFormatError(
            f"condition map '{path}' is a {image.mode} image ({len(image.getbands())} channel(s)), but a depth map "
            f"must be single-channel. Save depth as an 8- or 16-bit grayscale PNG.")
    depth = np.asarray(image, dtype=np.float32)
    if depth.min() < 0 or depth.max() > 65535:
        raise DatasetFormatError(
            f"depth map '{path}' holds values from {depth.min():g} to {depth.max():g}, outside the 16-bit range "
            f"0..65535. Save depth as an 8- or 16-bit grayscale PNG.")
    return Image.fromarray(depth * (2 / _DEPTH_SCALES[image.mode]) - 1)  # float32 -> mode F


def condition_tensor(image: Image.Image, kind: ConditionKind, image_size: int) -> torch.Tensor:
    """A map from ``open_condition``, resized and cropped like an image: long labels or float depth, [1,H,W]."""
    if kind == "segmentation":
        labels = np.asarray(resize_center_crop(image, image_size, Image.Resampling.NEAREST), dtype=np.int64)
        return torch.from_numpy(labels)[None]
    depth = np.asarray(resize_center_crop(image, image_size, Image.Resampling.BILINEAR), dtype=np.float32)
    return torch.from_numpy(depth.copy())[None].clamp_(-1.0, 1.0)


def check_sizes(image: Image.Image, image_path: Path, condition: Image.Image, condition_path: Path) -> None:
    """DatasetFormatError unless an image and its condition map have one size."""
    if image.size != condition.size:
        raise DatasetFormatError(
            f"image '{image_path}' is {image.width}x{image.height} but its condition map '{condition_path}' is "
            f"{condition.width}x{condition.height} (width x height, after the image's EXIF rotation). A map must "
            f"have its image's size: resize it (nearest for label maps) or fix the pairing.")


class PairedDataset(FolderDataset):
    """Images with condition maps; items ``(image, condition, 0)`` (see the module docstring)."""

    def __init__(self, pairs: list[tuple[Path, Path]], kind: ConditionKind, image_size: int, channels: int,
                 num_labels: int = 0, augment: bool = False, skip_bad_images: bool = False,
                 root: str | Path = "") -> None:
        if kind not in CONDITION_KINDS:
            raise ValueError(f"kind must be one of {', '.join(CONDITION_KINDS)}, got {kind!r}.")
        super().__init__([image for image, _ in pairs], [0] * len(pairs), [], image_size, channels, augment,
                         skip_bad_images, root)
        self.conditions = [condition for _, condition in pairs]
        self.kind = kind
        self.num_labels = num_labels

    def __repr__(self) -> str:
        size = f"{self.image_size}x{self.image_size}x{self.channels}"
        return f"PairedDataset('{self.root}': {len(self)} images with {self.kind} maps, {size})"

    def load(self, position: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image_path, condition_path = self.paths[position], self.conditions[position]
        image = open_image(image_path)  # full size, so that it can be compared with the map's
        condition = open_condition(condition_path, self.kind, self.num_labels)
        check_sizes(image, image_path, condition, condition_path)
        pixels = image_tensor(image, self.image_size, self.channels)
        target = condition_tensor(condition, self.kind, self.image_size)
        if self.augment:
            pixels, target = random_hflip_pair(pixels, target)
        return pixels, target, 0


def load_paired(root: str | Path, split: str, kind: ConditionKind, image_size: int, channels: int,
                num_labels: int = 0, eval_samples: int = 0, augment: bool = False,
                skip_bad_images: bool = False) -> PairedDataset:
    """The ``split`` ('train' or 'test') of a paired folder, split as described in the module docstring."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"paired folder '{root}' does not exist (or is not a folder). Set data.root to a "
                                   f"folder with images/NAME.ext and conditions/NAME.png.")
    dirs = split_dirs(root)
    if dirs is not None:
        pairs = split_items(split, eval_samples, pair_up(dirs[0]), pair_up(dirs[1]))
    else:
        pairs = split_items(split, eval_samples, pair_up(root), None)
    return PairedDataset(pairs, kind, image_size, channels, num_labels, augment, skip_bad_images, root)

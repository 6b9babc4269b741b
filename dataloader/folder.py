"""Any folder of images as a dataset: recursive, optional class subfolders, resize + center crop.

Files with the extensions in ``EXTENSIONS`` are collected recursively (symlinked folders followed,
each real folder at most once, so a symlink loop ends; names starting with '.' ignored) and sorted by
path. When the scan leaves files or folders out, one warning says how many for which reason. With
``class_labels`` each image's class is the name of its top-level subfolder (classes sorted by name;
both splits share one mapping).

Splits: when ``root`` holds ``train/`` and ``test/`` (or ``val/``) folders, those are the splits and
the test split keeps ``eval_samples`` images spread evenly over its sorted paths (0 = all). Otherwise
the test split is held out of the one folder: ``min(eval_samples, 10% of the images)`` images (10%
when ``eval_samples`` is 0), at evenly spaced positions of the sorted list so every class subfolder
contributes; the train split is the rest. A folder of fewer than 10 images uses all images for both.
A ``train/`` folder without a ``test/`` or ``val/`` sibling is an ordinary subfolder.

Every image becomes 8-bit grayscale or RGB: 16-bit grayscale is scaled to 8 bits (65535 -> 255;
a 32-bit integer image counts as 16-bit when a value exceeds 255), palette and transparent images
are composited over white, EXIF rotation is applied. The shorter side is resized to ``image_size``
(bicubic, antialiased when shrinking; images smaller than the crop are upscaled the same way), then
the centre square is cropped.

Unreadable files (corrupt, truncated, not an image) raise ``BadImageError`` naming the file when they
are loaded. With ``skip_bad_images`` such a file is reported once by a warning with a running count,
remembered, and replaced by the next readable image in the list; nothing is pre-scanned, so start-up
stays instant for large folders. The count is per process (each DataLoader worker warns for itself).
"""

import hashlib
import os
import struct
import warnings
from collections import Counter
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from .errors import BadImageError, DatasetFormatError, DatasetNotFoundError
from .transforms import random_hflip, to_tensor

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
HELD_OUT_EVERY = 10  # without split folders, at most one image in this many goes to the test split
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, Image.DecompressionBombError)
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")
Item = TypeVar("Item")


def list_images(root: Path) -> list[Path]:
    """Image files under ``root`` (recursive, sorted, hidden names skipped); warns once about what it left out."""
    found, skipped = _scan(root)
    if skipped:
        reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(skipped.items()))
        warnings.warn(f"the scan of '{root}' left out {reasons}.", stacklevel=2)
    return found


def _scan(root: Path) -> tuple[list[Path], Counter]:
    """(image files under ``root``, sorted; counts of what was left out by reason)."""
    found: list[Path] = []
    skipped: Counter = Counter()
    seen = {os.path.realpath(root)}
    unreadable: list[OSError] = []
    for directory, subdirs, files in os.walk(root, followlinks=True, onerror=unreadable.append):
        kept = []
        for name in sorted(subdirs):  # sorted: the same link wins on every scan
            real = os.path.realpath(os.path.join(directory, name))
            if name.startswith("."):
                skipped["hidden folder(s)"] += 1
            elif real in seen:
                skipped["symlinked folder(s) already scanned (a loop or a second link)"] += 1
            else:
                seen.add(real)
                kept.append(name)
        subdirs[:] = kept
        for name in files:
            path = Path(directory, name)
            if name.startswith("."):
                skipped["hidden file(s)"] += 1
            elif os.path.splitext(name)[1].lower() not in EXTENSIONS:
                skipped[f"file(s) without an image extension ({', '.join(EXTENSIONS)})"] += 1
            elif not path.exists():
                skipped["broken symlink(s)"] += 1
            elif not path.is_file():  # a named pipe or a device would block or never end when read
                skipped["special file(s) that are not regular files (pipes, sockets, devices)"] += 1
            else:
                found.append(path)
    if unreadable:
        shown = "; ".join(f"'{err.filename}' ({err.strerror})" for err in unreadable[:3])
        more = f" and {len(unreadable) - 3} more" if len(unreadable) > 3 else ""
        skipped[f"unreadable folder(s), whose images are not used: {shown}{more}"] = len(unreadable)
    return sorted(found), skipped


def folder_fingerprint(root: str | Path) -> str:
    """Hash of the names, sizes and modification times of the images under ``root``: changes when they do."""
    digest = hashlib.sha256()
    for path in _scan(Path(root))[0]:
        stat = path.stat()
        digest.update(os.fsencode(path.relative_to(root)))  # bytes: a name need not be valid UTF-8
        digest.update(f"\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def to_8bit(image: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL image to 8-bit 'L' (channels 1) or 'RGB' (channels 3)."""
    if image.mode in _SIXTEEN_BIT:
        values = np.asarray(image, dtype=np.float64)
        if image.mode != "I" or values.max() > 255:
            values = values / 257.0
        image = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in _ALPHA:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    return image.convert("L" if channels == 1 else "RGB")


def resize_center_crop(image: Image.Image, size: int,
                       resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
    """Resize the shorter side to ``size`` (up or down) and crop the centre ``size`` x ``size`` square."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), resample)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return image.crop((left, top, left + size, top + size))


def open_image(path: Path, draft_size: int | None = None) -> Image.Image:
    """Decode one file with its EXIF rotation applied; BadImageError if unreadable. With ``draft_size`` a JPEG may
    decode at a reduced size no smaller than that (faster)."""
    try:
        with Image.open(path) as image:
            if draft_size is not None:
                image.draft(None, (draft_size, draft_size))
            image.load()
            return ImageOps.exif_transpose(image)
    except _DECODE_ERRORS as err:
        raise BadImageError(f"cannot read image '{path}' ({type(err).__name__}: {err}). Replace or delete the "
                            f"file, or set data.skip_bad_images: true to skip unreadable images.") from err


def load_image(path: Path, image_size: int, channels: int) -> torch.Tensor:
    """Decode, convert and crop one file to a [C,H,W] tensor in [-1, 1]; BadImageError if unreadable."""
    return image_tensor(open_image(path, image_size), image_size, channels)


def image_tensor(image: Image.Image, image_size: int, channels: int) -> torch.Tensor:
    """Convert and crop a decoded image to a [C,H,W] tensor in [-1, 1]."""
    return to_tensor(np.asarray(resize_center_crop(to_8bit(image, channels), image_size)))


class FolderDataset(Dataset):
    """Images at ``paths`` with integer ``labels``; see the module docstring for conversion and errors."""

    def __init__(self, paths: list[Path], labels: list[int], class_names: list[str], image_size: int,
                 channels: int, augment: bool = False, skip_bad_images: bool = False, root: str | Path = "") -> None:
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels.")
        self.paths = paths
        self.labels = labels
        self.class_names = class_names
        self.num_classes = len(class_names)
        self.image_size = image_size
        self.channels = channels
        self.augment = augment
        self.skip_bad_images = skip_bad_images
        self.root = Path(root)
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        size = f"{self.image_size}x{self.image_size}x{self.channels}"
        return f"FolderDataset('{self.root}': {len(self)} images, {size}, {self.num_classes} classes)"

    def __getitem__(self, index: int) -> tuple:
        """The item ``load`` gives at ``index`` (or at the next readable position with ``skip_bad_images``)."""
        count = len(self.paths)
        for step in range(count):
            position = (index + step) % count
            if position in self._bad:
                continue
            try:
                return self.load(position)
            except BadImageError as err:
                if not self.skip_bad_images:
                    raise
                self._bad.add(position)
                warnings.warn(f"skipping unreadable image #{len(self._bad)} of this process, using the next "
                              f"readable one instead: {err}", stacklevel=2)
        raise BadImageError(f"none of the {count} images under '{self.root}' can be read.")

    def load(self, position: int) -> tuple[torch.Tensor, int]:
        """The item at ``position``, or BadImageError (which ``skip_bad_images`` turns into the next item)."""
        image = load_image(self.paths[position], self.image_size, self.channels)
        if self.augment:
            image = random_hflip(image)
        return image, self.labels[position]


def split_dirs(root: Path) -> tuple[Path, Path] | None:
    """The (train, test) folders of ``root`` when it has them (see the module docstring)."""
    if not (root / "train").is_dir():
        return None
    for name in ("test", "val"):
        if (root / name).is_dir():
            return root / "train", root / name
    return None


def _spread(count: int, keep: int) -> list[int]:
    """``keep`` evenly spaced positions among ``count`` (all when keep covers them)."""
    if keep >= count:
        return list(range(count))
    return [(2 * k + 1) * count // (2 * keep) for k in range(keep)]


def split_items(split: str, eval_samples: int, train: list[Item], test: list[Item] | None) -> list[Item]:
    """The items of ``split``: from split folders' ``train`` and ``test`` lists, or, when ``test`` is None, held
    out of the one list ``train`` (the rules of the module docstring)."""
    if test is not None:
        return train if split == "train" else [test[i] for i in _spread(len(test), eval_samples or len(test))]
    keep = len(train) // HELD_OUT_EVERY
    if eval_samples > 0:
        keep = min(keep, eval_samples)
    held = set(_spread(len(train), keep))
    if split == "train":
        return [item for i, item in enumerate(train) if i not in held]
    return [train[i] for i in sorted(held)] or train


def listed(directory: Path) -> list[Path]:
    """The images under ``directory`` (as ``list_images``); DatasetNotFoundError when there are none."""
    paths = list_images(directory)
    if not paths:
        raise DatasetNotFoundError(f"no images found in '{directory}' (searched recursively for "
                                   f"{', '.join(EXTENSIONS)}; names starting with '.' are ignored). "
                                   f"Point data.root at a folder of images.")
    return paths


def _warn_about_empty_classes(every: list[tuple[Path, Path]], names: list[str]) -> None:
    """Warn about subfolders of the class folders' parents that hold no images: they are not classes, so the
    class count is lower than the folder count suggests."""
    empty = sorted({f"{base / entry.name}" for base in {b for _, b in every} for entry in os.scandir(base)
                    if entry.is_dir() and not entry.name.startswith(".") and entry.name not in names})
    if empty:
        warnings.warn(f"{len(empty)} class folder(s) hold no images and are not classes: {', '.join(empty[:5])}"
                      f"{' ...' if len(empty) > 5 else ''}. The data has {len(names)} classes "
                      f"({', '.join(names[:10])}{' ...' if len(names) > 10 else ''}).", stacklevel=3)


def _class_of(path: Path, base: Path) -> str:
    parts = path.relative_to(base).parts
    if len(parts) < 2:
        raise DatasetFormatError(f"'{path}' lies directly in '{base}' but data.class_labels is true: put every "
                                 f"image in a subfolder named after its class, or set data.class_labels: false.")
    return parts[0]


def load_folder(root: str | Path, split: str, image_size: int, channels: int, class_labels: bool = False,
                eval_samples: int = 0, augment: bool = False, skip_bad_images: bool = False) -> FolderDataset:
    """The ``split`` ('train' or 'test') of an image folder, split as described in the module docstring."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetNotFoundError(f"image folder '{root}' does not exist (or is not a folder). Set data.root to a "
                                   f"folder of images ({', '.join(EXTENSIONS)}; searched recursively).")
    dirs = split_dirs(root)
    if dirs is not None:
        train: list[tuple[Path, Path]] = [(p, dirs[0]) for p in listed(dirs[0])]
        test: list[tuple[Path, Path]] | None = [(p, dirs[1]) for p in listed(dirs[1])]
        every = train + test
    else:
        every = train = [(p, root) for p in listed(root)]
        test = None
    chosen = split_items(split, eval_samples, train, test)
    names: list[str] = []
    labels = [0] * len(chosen)
    if class_labels:
        names = sorted({_class_of(p, base) for p, base in every})
        _warn_about_empty_classes(every, names)
        index = {name: i for i, name in enumerate(names)}
        labels = [index[_class_of(p, base)] for p, base in chosen]
    return FolderDataset([p for p, _ in chosen], labels, names, image_size, channels, augment, skip_bad_images,
                         root)

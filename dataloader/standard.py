"""MNIST, Fashion-MNIST and CIFAR-10: read from disk, fetched by torchvision where online, else a clear error.

MNIST and Fashion-MNIST are read with our own idx reader from the four original files, either lying
directly in ``root`` (as Debian's ``dataset-fashion-mnist`` installs them in
/usr/share/datasets/fashion-mnist/) or in torchvision's layout ``root/MNIST/raw`` and
``root/FashionMNIST/raw``; each file may be gzip-compressed or not. Downloads go through torchvision
after a quick reachability check, so an offline machine fails in seconds instead of hanging.
"""

import socket
import threading
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets

from .errors import DatasetFormatError, DatasetNotFoundError
from .idx import read_idx
from .transforms import match_channels, random_hflip, resize_square, to_tensor

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_SETS = {"mnist": ("MNIST", tv_datasets.MNIST), "fashion_mnist": ("Fashion-MNIST", tv_datasets.FashionMNIST)}
_DOWNLOAD_TIMEOUT_S = 60.0
_PROBE_TIMEOUT_S = 5.0


class ArrayDataset(Dataset):
    """In-memory uint8 images ([N,H,W] or [N,H,W,C]) with labels, resized and converted on access."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, image_size: int, channels: int,
                 num_classes: int, augment: bool = False, name: str = "arrays",
                 class_names: list[str] | None = None) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{name}: {len(images)} images but {len(labels)} labels.")
        self.images = images
        self.labels = labels.astype(np.int64)
        self.image_size = image_size
        self.channels = channels
        self.num_classes = num_classes
        self.class_names = class_names or [str(label) for label in range(num_classes)]
        self.augment = augment
        self.name = name

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return (f"ArrayDataset({self.name}: {len(self)} images, {self.image_size}x{self.image_size}x{self.channels}, "
                f"{self.num_classes} classes)")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = match_channels(resize_square(to_tensor(self.images[index]), self.image_size), self.channels)
        if self.augment:
            image = random_hflip(image)
        return image, int(self.labels[index])


def is_online(urls: list[str], timeout: float = _PROBE_TIMEOUT_S) -> bool:
    """True when a TCP connection to one of the URLs' hosts opens within ``timeout`` seconds in all.

    With a proxy configured the check is left to the download itself (returns True).
    """
    if urllib.request.getproxies():
        return True
    reached: list[bool] = []

    def probe() -> None:
        for url in urls:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            try:
                socket.create_connection((parts.hostname, port), timeout=timeout).close()
            except OSError:
                continue
            reached.append(True)
            return

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(reached)


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _download(fetch: type, root: Path, urls: list[str], train: bool) -> str | None:
    """Let torchvision download into ``root``; returns why it failed, or None on success."""
    if not is_online(urls):
        return f"no connection to {', '.join(urlsplit(u).hostname or u for u in urls)}"
    try:
        with _socket_timeout(_DOWNLOAD_TIMEOUT_S):
            fetch(str(root), train=train, download=True)
    except Exception as err:  # torchvision raises RuntimeError, URLError, OSError, ... on failed downloads
        return f"{type(err).__name__}: {err}"
    return None


def _existing(directory: Path, name: str) -> Path | None:
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    return None


def _find_idx(root: Path, folder: str, split: str) -> tuple[Path, Path] | None:
    for directory in (root, root / folder / "raw"):
        images, labels = (_existing(directory, name) for name in IDX_FILES[split])
        if images and labels:
            return images, labels
    return None


def _head(count: int, eval_samples: int) -> int:
    """Number of test items to keep: the first ``eval_samples`` (0 or more than there are = all)."""
    return eval_samples if 0 < eval_samples < count else count


def load_idx_dataset(name: str, root: str | Path, split: str, image_size: int, channels: int,
                     download: bool = False, eval_samples: int = 0, augment: bool = False) -> ArrayDataset:
    """MNIST (``name='mnist'``) or Fashion-MNIST (``'fashion_mnist'``) from idx files under ``root``."""
    title, fetch = _IDX_SETS[name]
    root = Path(root)
    folder = fetch.__name__
    found = _find_idx(root, folder, split)
    failure = None
    if found is None and download:
        failure = _download(fetch, root, list(fetch.mirrors), split == "train")
        found = _find_idx(root, folder, split)
        failure = failure or "it finished without leaving the files there"
    if found is None:
        raise DatasetNotFoundError(_missing_idx_message(name, title, root, folder, fetch.mirrors[0], download, failure))
    images_path, labels_path = found
    images, labels = read_idx(images_path, ndim=3), read_idx(labels_path, ndim=1)
    if images.dtype != np.uint8 or len(images) != len(labels):
        raise DatasetFormatError(f"'{images_path}' ({images.dtype}, {len(images)} images) does not match "
                                 f"'{labels_path}' ({len(labels)} labels); expected uint8 images, one label each.")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DatasetFormatError(f"'{labels_path}' holds labels outside 0..9; is it a {title} label file?")
    if split == "test":
        keep = _head(len(images), eval_samples)
        images, labels = images[:keep], labels[:keep]
    return ArrayDataset(images, labels, image_size, channels, 10, augment, f"{title} {split}",
                        _names(fetch))


def _names(source: object) -> list[str] | None:
    """The class names torchvision gives a dataset (``classes``), where it has them."""
    names = getattr(source, "classes", None)
    return list(names) if names else None


def _missing_idx_message(name: str, title: str, root: Path, folder: str, mirror: str, download: bool,
                         failure: str | None) -> str:
    files = ", ".join(f"{n}.gz" for split in ("train", "test") for n in IDX_FILES[split])
    lines = [f"{title} files not found under '{root}'.",
             f"Put the four files {files} (gzip-compressed or unpacked) either directly in '{root}' "
             f"or in '{root / folder / 'raw'}' (torchvision's layout), or point data.root at the folder "
             f"that holds them."]
    if download:
        lines.append(f"The download failed ({failure}); online, it fetches them from {mirror}.")
    else:
        lines.append(f"To fetch them, set data.download: true on a machine with internet, "
                     f"or download them from {mirror}.")
    if name == "fashion_mnist":
        lines.append("On Debian/Ubuntu: `sudo apt install dataset-fashion-mnist` installs them in "
                     "/usr/share/datasets/fashion-mnist/; then set data.root=/usr/share/datasets/fashion-mnist.")
    return "\n".join(lines)


def load_cifar10(root: str | Path, split: str, image_size: int, channels: int, download: bool = False,
                 eval_samples: int = 0, augment: bool = False) -> ArrayDataset:
    """CIFAR-10 through torchvision from ``root/cifar-10-batches-py``."""
    root = Path(root)
    fetch = tv_datasets.CIFAR10
    train = split == "train"
    failure = None
    try:
        data = fetch(str(root), train=train, download=False)
    except RuntimeError:
        data = None
    if data is None and download:
        failure = _download(fetch, root, [fetch.url], train)
        if failure is None:
            data = fetch(str(root), train=train, download=False)
    if data is None:
        raise DatasetNotFoundError(_missing_cifar_message(root, fetch, download, failure))
    images, labels = np.asarray(data.data, dtype=np.uint8), np.asarray(data.targets)
    if not train:
        keep = _head(len(images), eval_samples)
        images, labels = images[:keep], labels[:keep]
    return ArrayDataset(images, labels, image_size, channels, 10, augment, f"CIFAR-10 {split}", _names(data))


def _missing_cifar_message(root: Path, fetch: type, download: bool, failure: str | None) -> str:
    folder = root / fetch.base_folder
    files = ", ".join(name for name, _ in fetch.train_list + fetch.test_list) + f", {fetch.meta['filename']}"
    lines = [f"CIFAR-10 not found (or damaged) in '{folder}'.",
             f"That folder must hold {files} (the python version of CIFAR-10).",
             f"To get it: download {fetch.url} and unpack it inside '{root}' "
             f"(tar xzf {fetch.filename} -C {root})"]
    if download:
        lines[-1] += f"; the automatic download failed ({failure})."
    else:
        lines[-1] += ", or set data.download: true on a machine with internet."
    return "\n".join(lines)

"""Datasets (builtin shapes, MNIST, Fashion-MNIST, CIFAR-10, image folders) and loaders for training."""

from .datasets import build_dataset, class_names_of, data_settings, num_classes_of
from .errors import BadImageError, DataError, DatasetFormatError, DatasetNotFoundError
from .loader import CheckedLoader, build_loader, infinite_batches

__all__ = [
    "BadImageError",
    "CheckedLoader",
    "DataError",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "build_dataset",
    "build_loader",
    "class_names_of",
    "data_settings",
    "infinite_batches",
    "num_classes_of",
]

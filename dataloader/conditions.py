"""Condition maps computed from the images themselves, and the views of a dataset that yield only its maps or only
its images."""

from typing import Literal

import torch
from torch.utils.data import Dataset

from .transforms import coord_map, lowres_condition

DerivedKind = Literal["lowres", "coord"]


class DerivedConditions(Dataset):
    """Items ``(image, label)`` of ``dataset`` become ``(image, condition, label)``: with ``lowres`` the image at
    1/``lowres_factor`` of its size, upsampled back (``lowres_condition``, after any flip); with ``coord`` the
    pixel positions (``coord_map``, the same for every image)."""

    def __init__(self, dataset: Dataset, kind: DerivedKind, lowres_factor: int = 4) -> None:
        if kind not in ("lowres", "coord"):
            raise ValueError(f"kind must be 'lowres' or 'coord', got {kind!r}.")
        self.dataset = dataset
        self.kind = kind
        self.lowres_factor = lowres_factor

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        factor = f" (factor {self.lowres_factor})" if self.kind == "lowres" else ""
        return f"{self.dataset!r} with {self.kind} conditions{factor}"

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image, label = self.dataset[index]
        if self.kind == "lowres":
            condition = lowres_condition(image, self.lowres_factor)
        else:
            condition = coord_map(*image.shape[-2:])
        return image, condition, label


class ConditionsOnly(Dataset):
    """Items ``(image, condition, label)`` of ``dataset`` become ``(condition, label)``: the data a condition
    tokenizer trains on."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        return f"condition maps of {self.dataset!r}"

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        _, condition, label = self.dataset[index]
        return condition, label


class ImagesOnly(Dataset):
    """Items ``(image, condition, label)`` of ``dataset`` become ``(image, label)``: the images of data with condition
    maps, for what reads images alone (reconstructions, tokens, FID references)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        return f"images of {self.dataset!r}"

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, _, label = self.dataset[index]
        return image, label

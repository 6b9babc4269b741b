"""Square windows of larger images: random crops in training, centre crops in evaluation, one crop for an image and
every map that comes with it (``data.crop_size``)."""

import torch
from torch.utils.data import Dataset


def crop_offset(length: int, size: int, random: bool) -> int:
    """Where a crop of ``size`` starts along a side of ``length``: drawn uniformly from torch's global generator
    (seeded per worker), or the centre."""
    if random:
        return int(torch.randint(length - size + 1, ()))
    return (length - size) // 2


class Crops(Dataset):
    """Items of ``dataset`` with every tensor of the first tensor's height and width (an image or a code grid, its
    condition map) cropped to ``size`` x ``size`` at the same place; other entries (labels) pass unchanged."""

    def __init__(self, dataset: Dataset, size: int, random: bool) -> None:
        self.dataset = dataset
        self.size = size
        self.random = random

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        return f"{'random' if self.random else 'centre'} {self.size}x{self.size} crops of {self.dataset!r}"

    def __getitem__(self, index: int) -> tuple:
        item = self.dataset[index]
        height, width = item[0].shape[-2:]
        if height < self.size or width < self.size:
            raise ValueError(f"item {index} is {height}x{width}, smaller than the {self.size}x{self.size} crop.")
        top, left = crop_offset(height, self.size, self.random), crop_offset(width, self.size, self.random)
        return tuple(entry[..., top:top + self.size, left:left + self.size]
                     if isinstance(entry, torch.Tensor) and entry.dim() >= 2 and entry.shape[-2:] == (height, width)
                     else entry for entry in item)

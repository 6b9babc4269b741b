"""The pictures ``generate.py visualize`` draws of a trained tokenizer, as PNGs into one folder:

* ``reconstructions.png``: originals (top row) above their reconstructions;
* ``codebook_usage.png``: how often each code is used over the images, sorted from most used;
* ``token_maps.png``: images beside their code grids drawn in colour (one colour per code).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from utils.pictures import plot_code_histogram, plot_token_maps, save_reconstruction_grid
from vqgan.model import VQGAN

SHOWN_RECONSTRUCTIONS = 8
SHOWN_TOKEN_MAPS = 6


def tokenizer_pictures(vqgan: VQGAN, batches: Iterable, device: torch.device, out_dir: Path) -> list[Path]:
    """Reconstructions, codebook usage (over every image of the (images, labels) ``batches``) and token maps."""
    counts = torch.zeros(vqgan.codebook_size, dtype=torch.long)
    shown: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for images, _ in batches:
        indices, reconstructions = vqgan.reconstruct(images.to(device))
        indices, reconstructions = indices.cpu(), reconstructions.float().cpu()
        counts += torch.bincount(indices.flatten(), minlength=vqgan.codebook_size)
        if sum(len(part[0]) for part in shown) < max(SHOWN_RECONSTRUCTIONS, SHOWN_TOKEN_MAPS):
            shown.append((images, indices, reconstructions))
    images, indices, reconstructions = (torch.cat(parts) for parts in zip(*shown))
    paths = [out_dir / "reconstructions.png", out_dir / "codebook_usage.png", out_dir / "token_maps.png"]
    save_reconstruction_grid(images[:SHOWN_RECONSTRUCTIONS], reconstructions[:SHOWN_RECONSTRUCTIONS], paths[0])
    plot_code_histogram(counts, paths[1])
    plot_token_maps(images[:SHOWN_TOKEN_MAPS], indices[:SHOWN_TOKEN_MAPS], vqgan.codebook_size, paths[2])
    return paths

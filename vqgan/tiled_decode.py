"""Decoding code grids larger than the training grid: in one pass, or in overlapping tiles when memory runs out.

The decoder is convolutional (with attention over the whole feature map at its lowest resolutions), so a
large grid decodes in one pass, as taming decodes its sliding-window samples. When that pass does not fit in
the GPU's memory, :func:`decode_grid` decodes overlapping tiles and blends them: each tile's pixels are
weighted by a ramp that falls towards its edges, so a seam is a smooth mix of the two tiles that meet there.
"""

from __future__ import annotations

import torch

OVERLAP = 0.25  # share of a tile, on each side, that overlaps its neighbour


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """First rows (columns) of tiles of ``tile`` codes that cover ``size`` with at least ``overlap`` in common."""
    if tile >= size:
        return [0]
    step = max(1, tile - overlap)
    starts = list(range(0, size - tile, step))
    return starts + [size - tile]


def edge_ramp(length: int, ramp: int) -> torch.Tensor:
    """Weights [length]: 1 in the middle, falling linearly to ``1 / (ramp + 1)`` at both ends."""
    distance = torch.minimum(torch.arange(length), torch.arange(length).flip(0)).float()
    return ((distance + 1) / (ramp + 1)).clamp(max=1.0)


def decode_in_tiles(vqgan: torch.nn.Module, indices: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    """Images of the codes ``indices`` [B, H, W], decoded in overlapping ``tile`` (h, w) windows and blended."""
    factor = vqgan.downsample_factor
    height, width = indices.shape[1:]
    overlaps = [max(1, round(side * OVERLAP)) for side in tile]
    images = weights = None
    for top in tile_starts(height, tile[0], overlaps[0]):
        for left in tile_starts(width, tile[1], overlaps[1]):
            part = vqgan.decode_indices(indices[:, top:top + tile[0], left:left + tile[1]])
            if images is None:
                images = part.new_zeros(*part.shape[:2], height * factor, width * factor)
                weights = part.new_zeros(height * factor, width * factor)
            ramp = torch.outer(edge_ramp(part.shape[-2], overlaps[0] * factor),
                               edge_ramp(part.shape[-1], overlaps[1] * factor)).to(part)
            rows, columns = slice(top * factor, top * factor + part.shape[-2]), slice(left * factor,
                                                                                        left * factor + part.shape[-1])
            images[..., rows, columns] += part * ramp
            weights[rows, columns] += ramp
    return images / weights


def decode_grid(vqgan: torch.nn.Module, indices: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    """Images of the codes ``indices`` [B, H, W]: in one pass, or in ``tile`` windows when the pass runs out of
    GPU memory."""
    try:
        return vqgan.decode_indices(indices)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return decode_in_tiles(vqgan, indices, tile)

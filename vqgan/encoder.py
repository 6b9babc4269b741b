"""Convolutional encoder: images [B, C, H, W] -> latents [B, z_channels, H/f, W/f], f = 2**(len(ch_mult)-1)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vqgan.layers import AttnBlock, Downsample, ResnetBlock, group_norm


def level_sizes(resolution: int, ch_mult: Sequence[int], attn_resolutions: Sequence[int]) -> list[int]:
    """Feature-map size at each level for ``resolution`` inputs, after checking the geometry fits.

    Raises ``ValueError`` when ``resolution`` is not divisible by the downsample factor or when an
    entry of ``attn_resolutions`` is no level's size (it would silently get no attention).
    """
    if len(ch_mult) < 1:
        raise ValueError("ch_mult must have at least one entry, e.g. (1, 2, 2).")
    factor = 2 ** (len(ch_mult) - 1)
    if resolution < factor or resolution % factor:
        below = resolution - resolution % factor
        nearby = " or ".join(str(size) for size in sorted({max(factor, below), below + factor}))
        raise ValueError(
            f"resolution {resolution} is not divisible by the downsample factor {factor} "
            f"(2**(len(ch_mult)-1) for ch_mult={tuple(ch_mult)}). Use an image size that is a multiple of "
            f"{factor} (e.g. {nearby}) or fewer ch_mult levels."
        )
    sizes = [resolution // 2**i for i in range(len(ch_mult))]
    missing = [r for r in attn_resolutions if r not in sizes]
    if missing:
        raise ValueError(
            f"attn_resolutions {tuple(attn_resolutions)} contains {missing}, which is no feature-map size at "
            f"resolution {resolution}: the sizes are {sizes}. Pick attn_resolutions from these (or leave it empty)."
        )
    return sizes


def check_spatial_size(height: int, width: int, factor: int) -> None:
    """Raise ``ValueError`` unless both sides of an input are multiples of the downsample factor."""
    if height % factor or width % factor:
        raise ValueError(
            f"input size {height}x{width} is not divisible by the downsample factor {factor}. "
            f"Resize or crop images to a multiple of {factor}."
        )


class Encoder(nn.Module):
    """Taming VQGAN encoder: conv_in, ResNet (+attention) levels with downsampling, middle res-attn-res, conv_out."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        z_channels: int,
        resolution: int,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        sizes = level_sizes(resolution, ch_mult, attn_resolutions)
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, padding=1)
        self.down = nn.ModuleList()
        block_in = ch
        for level, (mult, size) in enumerate(zip(ch_mult, sizes)):
            block_out = ch * mult
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if size in attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
            stage.downsample = Downsample(block_in) if level != len(ch_mult) - 1 else nn.Identity()
            self.down.append(stage)
        self.mid = nn.Sequential(
            ResnetBlock(block_in, block_in, dropout), AttnBlock(block_in), ResnetBlock(block_in, block_in, dropout)
        )
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_spatial_size(x.shape[-2], x.shape[-1], self.downsample_factor)
        h = self.conv_in(x)
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))

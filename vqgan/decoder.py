"""Convolutional decoder: latents [B, z_channels, h, w] -> images [B, out_channels, h*f, w*f]."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vqgan.encoder import level_sizes
from vqgan.layers import AttnBlock, ResnetBlock, Upsample, group_norm


class Decoder(nn.Module):
    """Mirror of :class:`~vqgan.encoder.Encoder` with ``num_res_blocks + 1`` blocks per level.

    Levels run from the coarsest to the finest; every level but the finest ends with an upsample.
    The final convolution is ``conv_out`` (its weight drives the adaptive GAN weight).
    """

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        z_channels: int,
        resolution: int,
        out_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        sizes = level_sizes(resolution, ch_mult, attn_resolutions)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, padding=1)
        self.mid = nn.Sequential(
            ResnetBlock(block_in, block_in, dropout), AttnBlock(block_in), ResnetBlock(block_in, block_in, dropout)
        )
        self.up = nn.ModuleList()
        for level in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[level]
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if sizes[level] in attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
            stage.upsample = Upsample(block_in) if level != 0 else nn.Identity()
            self.up.append(stage)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in self.up:
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            h = stage.upsample(h)
        return self.apply_conv_out(F.silu(self.norm_out(h)))

    @property
    def last_layer_weight(self) -> torch.Tensor:
        """Weight of the final convolution (where the adaptive GAN weight is measured)."""
        return self.conv_out.weight

    @torch.compiler.disable
    def apply_conv_out(self, h: torch.Tensor) -> torch.Tensor:
        """``conv_out``, kept out of ``torch.compile`` graphs: the adaptive GAN weight asks for the
        gradient at this layer's weight alone, which outside a compiled graph costs one small
        convolution backward instead of a run of the whole compiled backward."""
        return self.conv_out(h)

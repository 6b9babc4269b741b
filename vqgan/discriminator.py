"""PatchGAN discriminator: a stack of strided 4x4 convolutions giving one real/fake logit per image patch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from utils.config import option
from vqgan.layers import group_norm

KERNEL = 4
PADDING = 1
LEAKY_SLOPE = 0.2
MAX_WIDTH_MULT = 8
INIT_STD = 0.02


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return group_norm(channels)
    return nn.Identity()


def _conv_out_size(size: int, stride: int) -> int:
    return (size + 2 * PADDING - KERNEL) // stride + 1


def logit_map_size(size: int, n_layers: int) -> int:
    """Side of the logit map of a discriminator with ``n_layers`` for an input side of ``size`` pixels."""
    for _ in range(n_layers):
        size = _conv_out_size(size, 2)
    return _conv_out_size(_conv_out_size(size, 1), 1)


@dataclass
class DiscriminatorConfig:
    """The ``disc`` config section."""

    n_layers: int = option(3, "PatchGAN depth (strided conv layers)")
    ndf: int = option(64, "filters of the first discriminator layer")
    norm: Literal["batch", "group", "none"] = option("batch", "normalisation inside the discriminator")


class Discriminator(nn.Module):
    """pix2pix ``NLayerDiscriminator``: logits [B, 1, h, w] for images [B, in_channels, H, W].

    ``n_layers`` stride-2 convolutions (widths ``ndf * min(2**i, 8)``), one stride-1 convolution and a
    stride-1 output convolution; LeakyReLU(0.2) between them and ``norm`` after every convolution
    but the first and the last. Convolutions followed by a norm have no bias. Weights are drawn as
    in pix2pix: conv weights N(0, 0.02), norm scales N(1, 0.02), biases zero.
    """

    def __init__(self, in_channels: int, config: DiscriminatorConfig) -> None:
        super().__init__()
        ndf, n_layers, norm = config.ndf, config.n_layers, config.norm
        if norm not in ("batch", "group", "none"):
            raise ValueError(f"norm must be 'batch', 'group' or 'none', got {norm!r}.")
        if n_layers < 1:
            raise ValueError(f"n_layers must be at least 1, got {n_layers}.")
        self.n_layers = n_layers
        use_bias = norm == "none"
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, KERNEL, stride=2, padding=PADDING),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
        ]
        width = ndf
        for i in range(1, n_layers + 1):
            next_width = ndf * min(2**i, MAX_WIDTH_MULT)
            stride = 2 if i < n_layers else 1
            layers += [
                nn.Conv2d(width, next_width, KERNEL, stride=stride, padding=PADDING, bias=use_bias),
                _norm_layer(norm, next_width),
                nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            ]
            width = next_width
        layers.append(nn.Conv2d(width, 1, KERNEL, stride=1, padding=PADDING))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def output_size(self, size: int) -> int:
        """Side of the logit map for an input side of ``size`` pixels."""
        return logit_map_size(size, self.n_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        if min(self.output_size(height), self.output_size(width)) < 1:
            raise ValueError(
                f"images of {height}x{width} are too small for a discriminator with n_layers={self.n_layers}. "
                f"Use fewer layers (disc.n_layers) or larger images."
            )
        return self.main(x)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, INIT_STD)
        nn.init.zeros_(module.bias)

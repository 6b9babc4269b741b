"""Random LPIPS weight files (VGG16 features and linear heads) so the perceptual loss runs offline.

Timing does not depend on the weight values, only on their shapes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import vgg16

from vqgan.lpips import TAP_CHANNELS


def write_random_lpips_weights(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write ``vgg16-random.pth`` (torchvision ``features.*`` keys) and ``heads-random.pth`` into ``folder``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        features = vgg16(weights=None).features
    features = features.to_empty(device="cpu")
    for layer in features:
        if isinstance(layer, nn.Conv2d):
            fan_in = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
            layer.weight.data = torch.randn(layer.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5
            layer.bias.data.zero_()
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=generator) for i, c in enumerate(TAP_CHANNELS)}
    vgg_path, heads_path = folder / "vgg16-random.pth", folder / "heads-random.pth"
    torch.save({f"features.{key}": value for key, value in features.state_dict().items()}, vgg_path)
    torch.save(heads, heads_path)
    return vgg_path, heads_path

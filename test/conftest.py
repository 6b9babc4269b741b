"""Shared fixtures: LPIPS weight files written by the tests themselves (no downloads)."""

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision.models import vgg16

from vqgan.lpips import TAP_CHANNELS


@dataclass
class LPIPSFiles:
    vgg: Path
    heads: Path


def random_vgg_features(seed: int) -> dict[str, torch.Tensor]:
    """A torchvision-format VGG16 state_dict (``features.*`` keys) with He-initialised random convs."""
    with torch.device("meta"):
        skeleton = vgg16(weights=None)
    features = skeleton.features.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    for layer in features:
        if isinstance(layer, nn.Conv2d):
            fan_out = layer.out_channels * layer.kernel_size[0] * layer.kernel_size[1]
            layer.weight.data = torch.randn(layer.weight.shape, generator=generator) * (2.0 / fan_out) ** 0.5
            layer.bias.data.zero_()
    return {f"features.{key}": value for key, value in features.state_dict().items()}


def random_heads(seed: int) -> dict[str, torch.Tensor]:
    """Non-negative linear heads with the keys and shapes of the LPIPS ``vgg.pth``."""
    generator = torch.Generator().manual_seed(seed)
    return {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=generator) for i, c in enumerate(TAP_CHANNELS)}


@pytest.fixture(scope="session")
def lpips_files(tmp_path_factory: pytest.TempPathFactory) -> LPIPSFiles:
    folder = tmp_path_factory.mktemp("lpips_weights")
    files = LPIPSFiles(vgg=folder / "vgg16-random.pth", heads=folder / "heads-random.pth")
    torch.save(random_vgg_features(seed=0), files.vgg)
    torch.save(random_heads(seed=0), files.heads)
    return files


# One intra-op thread per test process: the tiny models gain nothing from more, and on a loaded
# machine OpenMP threads that wait for each other make training steps ten times slower.
torch.set_num_threads(1)

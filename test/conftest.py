"""Shared fixtures: LPIPS weight files written by the tests themselves (no downloads), and the tiny
stage-1 model most tests build."""

from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from benchmarks.lpips_weights import write_random_lpips_weights
from vqgan import VQGAN, Discriminator, DiscriminatorConfig, LossConfig, VQGANConfig, VQGANLoss

TINY_VQGAN = VQGANConfig(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=4, embed_dim=4,
                         codebook_size=16)
TINY_DISC = DiscriminatorConfig(ndf=8, n_layers=2)


@pytest.fixture(autouse=True, scope="session")
def token_cache_in_a_temporary_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Stage-2 token caches of the tests (and of the scripts they start) go to a temporary folder, never to the
    user's ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VQGAN_TOKEN_CACHE", str(tmp_path_factory.mktemp("token_cache")))
        yield


@dataclass
class LPIPSFiles:
    vgg: Path
    heads: Path


def tiny_vqgan(resolution: int = 16, in_channels: int = 3, **options) -> VQGAN:
    """A 16x16 -> 8x8 tokens VQGAN with 16 codes; ``options`` replace fields of :data:`TINY_VQGAN`."""
    return VQGAN(replace(TINY_VQGAN, **options), in_channels=in_channels, resolution=resolution)


def tiny_models(lpips_files: LPIPSFiles | None = None, **loss_options) -> tuple[VQGAN, Discriminator, VQGANLoss]:
    """Tiny VQGAN (EMA codes, dead-code restarts), discriminator and loss with the GAN on from step 0
    (and LPIPS from ``lpips_files`` when given), in training mode, from seed 0."""
    torch.manual_seed(0)
    model = tiny_vqgan(ema=True, dead_code_steps=1).train()
    disc = Discriminator(3, TINY_DISC).train()
    options = dict(perceptual_weight=0.0, disc_start=0, disc_weight=0.7, adaptive_weight_max=1e4) | loss_options
    if lpips_files is not None:
        options.update(perceptual_weight=0.5, lpips_vgg_path=str(lpips_files.vgg),
                       lpips_heads_path=str(lpips_files.heads))
    return model, disc, VQGANLoss(LossConfig(**options)).train()


@pytest.fixture(scope="session")
def lpips_files(tmp_path_factory: pytest.TempPathFactory) -> LPIPSFiles:
    return LPIPSFiles(*write_random_lpips_weights(tmp_path_factory.mktemp("lpips_weights")))


# One intra-op thread per test process: the tiny models gain nothing from more, and on a loaded
# machine OpenMP threads that wait for each other make training steps ten times slower.
torch.set_num_threads(1)

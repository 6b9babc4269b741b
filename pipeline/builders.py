"""Build the stage-1 networks and loss from a config (shared by training and the benchmarks)."""

from __future__ import annotations

import dataclasses

from utils.config import Stage1Config
from vqgan import VQGAN, Discriminator, VQGANLoss


def build_models(cfg: Stage1Config) -> tuple[VQGAN, Discriminator, VQGANLoss]:
    """VQGAN, discriminator and loss exactly as the config describes them."""
    model = VQGAN(**dataclasses.asdict(cfg.model), in_channels=cfg.data.channels, resolution=cfg.data.image_size)
    disc = Discriminator(**dataclasses.asdict(cfg.disc), in_channels=cfg.data.channels)
    loss = VQGANLoss(**dataclasses.asdict(cfg.loss))
    return model, disc, loss

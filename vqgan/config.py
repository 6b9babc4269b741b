"""The stage-1 config: the sections ``train_vqgan.py`` reads, each defined next to what it configures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from utils.config import DataConfig, TrainConfig, check, opt, validate_data_and_train
from vqgan.discriminator import Discriminator, DiscriminatorConfig
from vqgan.loss import LossConfig, VQGANLoss
from vqgan.model import VQGAN, VQGANConfig


@dataclass
class Stage1TrainConfig(TrainConfig):
    """The ``train`` section of stage 1: the shared keys plus the discriminator's and the image layout's."""

    disc_lr: Optional[float] = opt(None, "discriminator learning rate (default: lr)")
    channels_last: bool = opt(True, "channels_last memory format on CUDA")
    init_from: Optional[str] = opt(
        None, "start a new run from the weights of this stage-1 checkpoint (autoencoder and discriminator, e.g. "
              "one made by generate.py import-taming); optimizers, step and RNG start fresh, and the model and "
              "disc sections must match its shapes (else an error lists the differences)")


@dataclass
class Stage1Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: VQGANConfig = field(default_factory=VQGANConfig)
    disc: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: Stage1TrainConfig = field(default_factory=Stage1TrainConfig)

    def validate(self) -> list[str]:
        """Raise ConfigError on impossible values; return warnings about suspicious ones."""
        validate_data_and_train(self.data, self.train)
        factor = 2 ** (len(self.model.ch_mult) - 1)
        check(self.data.image_size % factor == 0,
              f"data.image_size={self.data.image_size} is not divisible by the downsample factor {factor} "
              f"(2 ** (len(model.ch_mult) - 1)). Use an image size that is a multiple of {factor} "
              f"or change model.ch_mult.")
        check(self.model.codebook_size >= 2, f"model.codebook_size must be at least 2, got {self.model.codebook_size}.")
        check(self.model.beta >= 0, f"model.beta must be non-negative, got {self.model.beta}.")
        warnings = []
        if self.loss.disc_weight > 0 and self.loss.disc_start >= self.train.max_steps:
            warnings.append(f"loss.disc_start={self.loss.disc_start} is not below train.max_steps="
                            f"{self.train.max_steps}: the GAN loss never switches on. Lower loss.disc_start "
                            f"or set loss.disc_weight=0 to silence this.")
        return warnings


def build_stage1(cfg: Stage1Config) -> tuple[VQGAN, Discriminator, VQGANLoss]:
    """VQGAN, discriminator and loss exactly as the config describes them (weights from the global seed)."""
    model = VQGAN(cfg.model, in_channels=cfg.data.channels, resolution=cfg.data.image_size)
    disc = Discriminator(cfg.data.channels, cfg.disc)
    return model, disc, VQGANLoss(cfg.loss)

"""The stage-1 config: the sections ``train_vqgan.py`` reads, each defined next to what it configures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

from utils.config import (
    ConfigError,
    DataConfig,
    TrainConfig,
    building,
    check,
    check_counts,
    check_fraction,
    check_value,
    input_channels,
    option,
    training_size,
    validate_data_and_train,
)
from vqgan.discriminator import Discriminator, DiscriminatorConfig, logit_map_size
from vqgan.encoder import level_sizes
from vqgan.loss import LossConfig, VQGANLoss
from vqgan.model import VQGAN, VQGANConfig


@dataclass
class Stage1TrainConfig(TrainConfig):
    """The ``train`` section of stage 1: the shared keys plus the discriminator's and the image layout's."""

    disc_lr: Optional[float] = option(None, "discriminator learning rate (default: lr)")
    channels_last: bool = option(True, "channels_last memory format on CUDA, and on the CPU under train.compile")
    init_from: Optional[str] = option(
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

    # sections that only a stage-2 config has: (stage, script, example config) for the error message
    OTHER_STAGE: ClassVar[dict[str, tuple[str, str, str]]] = {
        name: ("stage-2", "train_transformer.py", "configs/quickstart.yaml") for name in ("transformer", "sample")}

    def validate(self) -> list[str]:
        """Raise ConfigError on impossible values or a model this code cannot train; return warnings about
        suspicious ones."""
        check(self.model.quantizer != "gumbel",
              "model.quantizer=gumbel is for models imported from taming-transformers (generate.py import-taming); "
              "training it is not supported. Train or fine-tune with model.quantizer=nearest (the default), or use "
              "the imported model as it is (generate.py reconstruct / tokens, train_transformer.py --vqgan).")
        return self.validate_description()

    def validate_description(self) -> list[str]:
        """:meth:`validate` without the check that the model can be trained: what the config stored with an
        imported model must pass."""
        validate_data_and_train(self.data, self.train)
        self._validate_model()
        self._validate_disc_and_loss()
        factor = 2 ** (len(self.model.ch_mult) - 1)
        key, size = self._size()
        check(size % factor == 0,
              f"{key}={size} is not divisible by the downsample factor {factor} "
              f"(2 ** (len(model.ch_mult) - 1)). Use an image size that is a multiple of {factor} "
              f"or change model.ch_mult.")
        check(self.model.codebook_size >= 2, f"model.codebook_size must be at least 2, got {self.model.codebook_size}.")
        check(self.model.beta >= 0, f"model.beta must be non-negative, got {self.model.beta}.")
        try:
            level_sizes(size, self.model.ch_mult, self.model.attn_resolutions)
        except ValueError as err:
            raise ConfigError(f"model.attn_resolutions={list(self.model.attn_resolutions)} does not fit "
                               f"{key}={size}: {err}") from None
        patch = logit_map_size(size, self.disc.n_layers)
        check(patch >= 1, f"disc.n_layers={self.disc.n_layers} is too deep for {key}={size}: "
                          f"the discriminator's logit map would be {patch}x{patch}. Use fewer layers, "
                          f"e.g. disc.n_layers={self._deepest_disc()}, or larger images.")
        self._validate_labels()
        warnings = []
        if self.loss.disc_weight > 0 and self.loss.disc_start >= self.train.max_steps:
            warnings.append(f"loss.disc_start={self.loss.disc_start} is not below train.max_steps="
                            f"{self.train.max_steps}: the GAN loss never switches on. Lower loss.disc_start "
                            f"or set loss.disc_weight=0 to silence this.")
        return warnings

    def _validate_model(self) -> None:
        m = self.model
        check_counts("model", m, {"ch": 1, "num_res_blocks": 0, "z_channels": 1, "embed_dim": 1, "dead_code_steps": 0,
                                  "usage_window": 1},
                     {"ch": 64, "num_res_blocks": 2, "z_channels": 64, "embed_dim": 64, "usage_window": 100})
        check_value("model.ch_mult", list(m.ch_mult), len(m.ch_mult) >= 1 and min(m.ch_mult) >= 1,
                    "a non-empty list of positive multipliers", "[1,2,2]")
        check_value("model.attn_resolutions", list(m.attn_resolutions), all(r >= 1 for r in m.attn_resolutions),
                    "a list of positive feature-map sizes (or [])", "[8]")
        check_fraction("model.dropout", m.dropout, 0.1)
        check_fraction("model.ema_decay", m.ema_decay, 0.99)
        check_value("model.ema_eps", m.ema_eps, m.ema_eps > 0, "positive", 1e-5)
        if m.codebook_dim is not None:
            check_value("model.codebook_dim", m.codebook_dim, 1 <= m.codebook_dim <= m.embed_dim,
                        f"null or between 1 and model.embed_dim={m.embed_dim} (codes are looked up in a lower "
                        f"dimension)", min(8, m.embed_dim))

    def _validate_disc_and_loss(self) -> None:
        check_counts("disc", self.disc, {"n_layers": 1, "ndf": 1}, {"n_layers": 3, "ndf": 64})
        loss = self.loss
        for key in ("rec_weight", "perceptual_weight", "codebook_weight", "disc_weight", "lecam_weight"):
            value = getattr(loss, key)
            check_value(f"loss.{key}", value, value >= 0, "0 or more", 1.0 if key != "lecam_weight" else 0.001)
        check_counts("loss", loss, {"disc_start": 0, "disc_warmup_steps": 0}, {"disc_start": 10000,
                                                                               "disc_warmup_steps": 1000})
        check_value("loss.adaptive_weight_max", loss.adaptive_weight_max, loss.adaptive_weight_max > 0, "positive",
                    1e4)
        check_fraction("loss.lecam_decay", loss.lecam_decay, 0.999)
        disc_lr = self.train.disc_lr
        check_value("train.disc_lr", disc_lr, disc_lr is None or disc_lr > 0, "null (= train.lr) or positive", 2e-4)

    def _validate_labels(self) -> None:
        """A segmentation tokenizer (label maps in, label logits out) trains on cross-entropy alone."""
        labels = segmentation_labels(self.data)
        if not labels:
            check(self.loss.rec_loss != "cross_entropy",
                  "loss.rec_loss=cross_entropy is for segmentation tokenizers (data.content=conditions with "
                  "data.condition=segmentation); use l1 or l2 for images.")
            return
        check(self.loss.rec_loss == "cross_entropy",
              f"a segmentation tokenizer predicts one of {labels} labels per pixel: set loss.rec_loss=cross_entropy "
              f"(it is {self.loss.rec_loss}).")
        for key in ("perceptual_weight", "disc_weight"):
            check(getattr(self.loss, key) == 0,
                  f"loss.{key}={getattr(self.loss, key)}, but LPIPS and the GAN judge pictures, not label maps: set "
                  f"loss.{key}=0 for a segmentation tokenizer.")

    def _size(self) -> tuple[str, int]:
        """The key and value of the size the model trains on (the crops when ``data.crop_size`` is set)."""
        if self.data.crop_size is not None:
            return "data.crop_size", self.data.crop_size
        return "data.image_size", self.data.image_size

    def _deepest_disc(self) -> int:
        layers = 1
        while logit_map_size(training_size(self.data), layers + 1) >= 1:
            layers += 1
        return layers


def segmentation_labels(data: DataConfig) -> int:
    """The number of labels when the model tokenizes segmentation maps (``data.content=conditions``), else 0."""
    return data.num_labels if data.content == "conditions" and data.condition == "segmentation" else 0


def build_stage1(cfg: Stage1Config) -> tuple[VQGAN, Discriminator, VQGANLoss]:
    """VQGAN, discriminator and loss exactly as the config describes them (weights from the global seed): an image
    tokenizer, or a tokenizer of the condition maps with ``data.content=conditions``."""
    with building("stage-1 model"):
        channels = input_channels(cfg.data)
        model = VQGAN(cfg.model, in_channels=channels, resolution=training_size(cfg.data),
                      num_labels=segmentation_labels(cfg.data))
        disc = Discriminator(channels, cfg.disc)
        return model, disc, VQGANLoss(cfg.loss)

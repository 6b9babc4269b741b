"""The stage-2 config: the sections ``train_transformer.py`` reads, each defined next to what it configures."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformer.prior import PriorConfig
from transformer.sampling import SamplingConfig
from utils.config import DataConfig, TrainConfig, check, validate_data_and_train


@dataclass
class Stage2Config:
    data: DataConfig = field(default_factory=DataConfig)
    transformer: PriorConfig = field(default_factory=PriorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SamplingConfig = field(default_factory=SamplingConfig)

    def validate(self) -> list[str]:
        """Raise ConfigError on impossible values; return warnings about suspicious ones."""
        validate_data_and_train(self.data, self.train)
        t = self.transformer
        check(t.n_embd % t.n_head == 0,
              f"transformer.n_embd={t.n_embd} must be divisible by transformer.n_head={t.n_head}.")
        check(0 <= t.pkeep <= 1, f"transformer.pkeep must be in [0, 1], got {t.pkeep}.")
        check(0 <= t.class_dropout < 1, f"transformer.class_dropout must be in [0, 1), got {t.class_dropout}.")
        return []

"""The stage-2 config: the sections ``train_transformer.py`` reads, each defined next to what it configures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from transformer.conditions import MAP_KINDS
from transformer.prior import PriorConfig
from transformer.sampling import SamplingConfig
from utils.config import (
    ConfigError,
    DataConfig,
    TrainConfig,
    check,
    check_counts,
    check_fraction,
    check_value,
    validate_data_and_train,
)


@dataclass
class Stage2Config:
    data: DataConfig = field(default_factory=DataConfig)
    transformer: PriorConfig = field(default_factory=PriorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SamplingConfig = field(default_factory=SamplingConfig)

    # sections that only a stage-1 config has: (stage, script, example config) for the error message
    OTHER_STAGE: ClassVar[dict[str, tuple[str, str, str]]] = {
        name: ("stage-1", "train_vqgan.py", "configs/quickstart_transformer.yaml")
        for name in ("model", "disc", "loss")}

    def validate(self) -> list[str]:
        """Raise ConfigError on impossible values; return warnings about suspicious ones."""
        validate_data_and_train(self.data, self.train)
        t = self.transformer
        check_counts("transformer", t, {"n_layer": 1, "n_head": 1, "n_embd": 1}, {"n_layer": 8, "n_head": 8,
                                                                               "n_embd": 512})
        check_fraction("transformer.dropout", t.dropout, 0.1)
        check(t.n_embd % t.n_head == 0,
              f"transformer.n_embd={t.n_embd} must be divisible by transformer.n_head={t.n_head}.")
        check(0 <= t.pkeep <= 1, f"transformer.pkeep must be in [0, 1], got {t.pkeep}.")
        check_fraction("transformer.condition_dropout", t.condition_dropout, 0.1)
        check_value("transformer.coord_levels", t.coord_levels, t.coord_levels >= 2, "at least 2", 256)
        self._validate_condition()
        head = t.n_embd // t.n_head
        check(t.positions != "rotary" or head % 2 == 0,
              f"transformer.positions=rotary needs an even head size, but transformer.n_embd={t.n_embd} / "
              f"transformer.n_head={t.n_head} = {head}; e.g. transformer.n_embd={t.n_head * (head + 1)}.")
        check_sampling(self.sample)
        return []

    def _validate_condition(self) -> None:
        """The data must give the condition the prior is conditioned on."""
        kind, data = self.transformer.condition, self.data
        check(data.content == "images", f"data.content={data.content}, but a prior is trained on the images' codes "
                                        f"(and data.condition for their conditions). Set data.content=images.")
        if kind in (*MAP_KINDS, "coord"):
            check(data.condition == kind,
                  f"transformer.condition={kind} needs the data to give {kind} maps: set data.condition={kind} "
                  f"(it is {data.condition}).")
        elif data.condition != "none":
            raise ConfigError(f"data.condition={data.condition} gives condition maps, but transformer.condition="
                              f"{kind} does not use them. Set transformer.condition={data.condition}, or "
                              f"data.condition=none.")


def check_sampling(s: SamplingConfig, names: dict[str, str] | None = None) -> None:
    """Raise ConfigError on impossible sampling settings, naming each by ``names[field]`` (a command-line
    flag, say) or else by its config key ``sample.FIELD``."""
    def name(key: str) -> str:
        return (names or {}).get(key, f"sample.{key}")

    check_value(name("temperature"), s.temperature, s.temperature > 0, "positive", 1.0)
    check_value(name("top_k"), s.top_k, s.top_k is None or s.top_k >= 1, "null (off) or at least 1", 100)
    check_value(name("top_p"), s.top_p, s.top_p is None or 0 < s.top_p <= 1, "null (off) or in (0, 1]", 0.95)
    check_value(name("cfg_scale"), s.cfg_scale, s.cfg_scale >= 0, "0 or more (1 = no guidance)", 1.5)
    check_value(name("window_caches"), s.window_caches, s.window_caches >= 0, "0 or more", 64)

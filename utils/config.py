"""Typed experiment configs: YAML files and dotted command-line overrides -> dataclasses.

A config file has one mapping per section (``data``, ``model``, ``disc``, ``loss``, ``train`` for
stage 1; ``data``, ``transformer``, ``train``, ``sample`` for stage 2). Unknown keys and values of
the wrong type raise :class:`ConfigError` naming the key and the closest valid one.

``python -m utils.config --describe`` prints every key with its default and meaning.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar, Union

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be turned into a valid config."""


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    name: Literal["builtin", "mnist", "fashion_mnist", "cifar10", "folder"] = _opt(
        "builtin", "dataset: builtin (procedural, offline), mnist, fashion_mnist, cifar10 or folder")
    root: str = _opt("data", "where the dataset lives (or is downloaded to); an image folder for name=folder")
    image_size: int = _opt(32, "images are resized (and center-cropped) to this square size")
    channels: int = _opt(3, "1 (grayscale) or 3 (RGB); images are converted to this")
    num_workers: int = _opt(2, "DataLoader worker processes (0 loads in the main process)")
    random_flip: bool = _opt(False, "random horizontal flips while training")
    class_labels: bool = _opt(False, "folder datasets: use each image's subfolder as its class")
    download: bool = _opt(True, "torchvision datasets: download when the files are missing")
    skip_bad_images: bool = _opt(False, "folder datasets: skip unreadable images with a warning instead of failing")
    num_samples: int = _opt(20000, "builtin dataset: number of training images")
    num_classes: int = _opt(10, "builtin dataset: number of classes")
    eval_samples: int = _opt(2000, "number of held-out images used for evaluation")


@dataclass
class ModelConfig:
    ch: int = _opt(64, "base channel count of encoder and decoder")
    ch_mult: tuple[int, ...] = _opt((1, 2, 2), "channel multiplier per level; downsample factor = 2**(len-1)")
    num_res_blocks: int = _opt(1, "ResNet blocks per encoder level (decoder uses one more)")
    attn_resolutions: tuple[int, ...] = _opt((8,), "feature-map sizes that get self-attention")
    z_channels: int = _opt(64, "channels of the encoder output / decoder input")
    dropout: float = _opt(0.0, "dropout inside ResNet blocks")
    codebook_size: int = _opt(512, "number of codes in the codebook")
    embed_dim: int = _opt(64, "dimension of a code vector (1x1 convs map z_channels to it and back)")
    codebook_dim: Optional[int] = _opt(None, "if set, look codes up in this lower dimension (factorised codes)")
    l2_norm: bool = _opt(False, "cosine-similarity lookup on l2-normalised vectors")
    beta: float = _opt(0.25, "commitment weight on the encoder term ||z - sg(z_q)||^2")
    ema: bool = _opt(False, "update codes by exponential moving averages instead of gradients")
    ema_decay: float = _opt(0.99, "decay of the EMA codebook update")
    ema_eps: float = _opt(1e-5, "Laplace smoothing of EMA cluster sizes")
    dead_code_steps: int = _opt(0, "re-seed codes unused for this many steps from recent encoder outputs (0 = off)")
    usage_window: int = _opt(100, "steps of indices kept for the codebook-usage statistic")


@dataclass
class DiscConfig:
    n_layers: int = _opt(3, "PatchGAN depth (strided conv layers)")
    ndf: int = _opt(64, "filters of the first discriminator layer")
    norm: Literal["batch", "group", "none"] = _opt("batch", "normalisation inside the discriminator")


@dataclass
class LossConfig:
    rec_loss: Literal["l1", "l2"] = _opt("l1", "pixel reconstruction loss")
    rec_weight: float = _opt(1.0, "weight of the pixel reconstruction loss")
    perceptual_weight: float = _opt(1.0, "weight of the LPIPS loss (0 = off; needs VGG16 + LPIPS weights)")
    codebook_weight: float = _opt(1.0, "weight of the codebook + commitment loss")
    disc_start: int = _opt(10000, "step at which the GAN loss starts")
    disc_weight: float = _opt(0.8, "weight of the generator (GAN) loss")
    disc_loss: Literal["hinge", "vanilla"] = _opt("hinge", "discriminator / generator loss form")
    adaptive_weight: bool = _opt(True, "scale the GAN loss by ||grad rec|| / ||grad gan|| at the decoder's last layer")
    adaptive_weight_max: float = _opt(1e4, "clamp of the adaptive weight")
    disc_warmup_steps: int = _opt(0, "ramp the GAN weight linearly from 0 over this many steps after disc_start")
    lecam_weight: float = _opt(0.0, "LeCam regularisation of the discriminator (0 = off)")
    lecam_decay: float = _opt(0.999, "EMA decay of the LeCam anchors")
    lpips_vgg_path: Optional[str] = _opt(None, "VGG16 ImageNet weights file (default: torchvision cache)")
    lpips_heads_path: Optional[str] = _opt(None, "LPIPS linear-head weights vgg.pth (default: from the lpips package)")


@dataclass
class TrainConfig:
    max_steps: int = _opt(10000, "optimizer steps to train for")
    batch_size: int = _opt(32, "images (or sequences) per step per process")
    lr: float = _opt(2e-4, "peak learning rate")
    disc_lr: Optional[float] = _opt(None, "discriminator learning rate (default: lr)")
    betas: tuple[float, float] = _opt((0.5, 0.9), "Adam betas")
    weight_decay: float = _opt(0.0, "AdamW weight decay (stage 2: matrices only)")
    warmup_steps: int = _opt(0, "linear learning-rate warmup steps")
    lr_schedule: Literal["constant", "cosine"] = _opt("constant", "learning-rate schedule after warmup")
    min_lr_ratio: float = _opt(0.1, "cosine schedule: final lr as a fraction of lr")
    grad_clip: float = _opt(1.0, "clip gradient norm to this (0 = off)")
    grad_accum: int = _opt(1, "micro-batches accumulated per optimizer step")
    ema_decay: float = _opt(0.0, "EMA of the model weights used for samples and evaluation (0 = off)")
    seed: int = _opt(0, "random seed")
    device: str = _opt("auto", "auto (CUDA if available), cpu, cuda or cuda:N")
    precision: Literal["auto", "bf16", "fp32"] = _opt(
        "auto", "auto = bf16 autocast on CUDA, fp32 on CPU; bf16 also pays on CPUs with AVX512-BF16 or AMX")
    compile: bool = _opt(False, "wrap models in torch.compile")
    channels_last: bool = _opt(True, "channels_last memory format on CUDA")
    log_every: int = _opt(50, "steps between metrics.csv rows and progress-bar updates")
    sample_every: int = _opt(500, "steps between sample grids")
    ckpt_every: int = _opt(1000, "steps between periodic checkpoints (last.pt is refreshed too)")
    num_sample_images: int = _opt(8, "images in each sample grid")
    max_bad_steps: int = _opt(20, "stop after this many consecutive non-finite steps")
    init_from: Optional[str] = _opt(
        None, "stage 1 only: start a new run from the weights of this stage-1 checkpoint (autoencoder and "
              "discriminator, e.g. one made by generate.py import-taming); optimizers, step and RNG start fresh, and "
              "the model and disc sections must match its shapes (else an error lists the differences)")


@dataclass
class TransformerConfig:
    n_layer: int = _opt(8, "transformer blocks")
    n_head: int = _opt(8, "attention heads")
    n_embd: int = _opt(512, "embedding width")
    dropout: float = _opt(0.0, "dropout in attention and MLP")
    positions: Literal["learned", "rotary"] = _opt("learned", "position encoding")
    class_conditional: bool = _opt(True, "condition on the dataset's class labels")
    class_dropout: float = _opt(0.1, "probability of dropping the class (enables classifier-free guidance)")
    pkeep: float = _opt(1.0, "probability of keeping each input token (the rest become random codes)")


@dataclass
class SampleConfig:
    temperature: float = _opt(1.0, "softmax temperature")
    top_k: Optional[int] = _opt(None, "keep only the k most likely codes")
    top_p: Optional[float] = _opt(None, "keep the smallest set of codes whose probability reaches p")
    cfg_scale: float = _opt(1.0, "classifier-free guidance scale (1 = plain conditional)")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _validate_common(data: DataConfig, train: TrainConfig) -> None:
    _check(data.channels in (1, 3), f"data.channels must be 1 or 3, got {data.channels}.")
    _check(data.image_size > 0, f"data.image_size must be positive, got {data.image_size}.")
    _check(train.lr > 0, f"train.lr must be positive, got {train.lr}; typical values are 1e-4 to 5e-4.")
    _check(train.max_steps > 0, f"train.max_steps must be positive, got {train.max_steps}.")
    _check(train.batch_size > 0, f"train.batch_size must be positive, got {train.batch_size}.")
    _check(train.grad_accum >= 1, f"train.grad_accum must be at least 1, got {train.grad_accum}.")
    _check(0 <= train.ema_decay < 1, f"train.ema_decay must be in [0, 1), got {train.ema_decay}.")
    _check(train.log_every > 0, f"train.log_every must be positive, got {train.log_every}.")
    _check(train.max_bad_steps > 0, f"train.max_bad_steps must be positive, got {train.max_bad_steps}.")


@dataclass
class Stage1Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    disc: DiscConfig = field(default_factory=DiscConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> list[str]:
        """Raise ConfigError on impossible values; return warnings about suspicious ones."""
        _validate_common(self.data, self.train)
        factor = 2 ** (len(self.model.ch_mult) - 1)
        _check(self.data.image_size % factor == 0,
               f"data.image_size={self.data.image_size} is not divisible by the downsample factor {factor} "
               f"(2 ** (len(model.ch_mult) - 1)). Use an image size that is a multiple of {factor} "
               f"or change model.ch_mult.")
        _check(self.model.codebook_size >= 2,
               f"model.codebook_size must be at least 2, got {self.model.codebook_size}.")
        _check(self.model.beta >= 0, f"model.beta must be non-negative, got {self.model.beta}.")
        warnings = []
        if self.loss.disc_weight > 0 and self.loss.disc_start >= self.train.max_steps:
            warnings.append(f"loss.disc_start={self.loss.disc_start} is not below train.max_steps="
                            f"{self.train.max_steps}: the GAN loss never switches on. Lower loss.disc_start "
                            f"or set loss.disc_weight=0 to silence this.")
        return warnings


@dataclass
class Stage2Config:
    data: DataConfig = field(default_factory=DataConfig)
    transformer: TransformerConfig = field(default_factory=TransformerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def validate(self) -> list[str]:
        """Raise ConfigError on impossible values; return warnings about suspicious ones."""
        _validate_common(self.data, self.train)
        t = self.transformer
        _check(t.n_embd % t.n_head == 0,
               f"transformer.n_embd={t.n_embd} must be divisible by transformer.n_head={t.n_head}.")
        _check(0 <= t.pkeep <= 1, f"transformer.pkeep must be in [0, 1], got {t.pkeep}.")
        _check(0 <= t.class_dropout < 1, f"transformer.class_dropout must be in [0, 1), got {t.class_dropout}.")
        _check(self.train.init_from is None, "train.init_from is for stage 1 (train_vqgan.py); stage 2 takes its "
                                             "VQGAN from --vqgan. Remove train.init_from from this config.")
        return []


ConfigT = TypeVar("ConfigT", Stage1Config, Stage2Config)


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else f" Valid keys: {', '.join(options)}."


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists to tuples, ints to floats."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {', '.join(map(repr, args))}.")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': expected a list, got {value!r}.")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"config key '{key}': expected {len(args)} values, got {len(value)}.")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true or false, got {value!r}.")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}.")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '1e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}.")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}.")
    raise ConfigError(f"config key '{key}': unsupported type {tp}.")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def from_dict(cls: type[ConfigT], data: dict[str, Any]) -> ConfigT:
    """Build a config of type ``cls`` from nested mappings, validating every key and value."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(data).__name__}.")
    sections = _field_types(cls)
    built = {}
    for section_name, section_data in data.items():
        if section_name not in sections:
            raise ConfigError(f"unknown config section '{section_name}'.{_closest(section_name, list(sections))}")
        if section_data is None:
            continue
        if not isinstance(section_data, dict):
            raise ConfigError(f"config section '{section_name}' must be a mapping of keys.")
        section_cls = sections[section_name]
        fields = _field_types(section_cls)
        values = {}
        for key, value in section_data.items():
            dotted = f"{section_name}.{key}"
            if key not in fields:
                valid = [f"{section_name}.{k}" for k in fields]
                raise ConfigError(f"unknown config key '{dotted}'.{_closest(dotted, valid)}")
            values[key] = _coerce(value, fields[key], dotted)
        built[section_name] = section_cls(**values)
    return cls(**built)


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) suitable for YAML and checkpoints."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def _set_dotted(data: dict[str, Any], dotted: str, raw: str) -> None:
    parts = dotted.split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override '{dotted}={raw}' must look like section.key=value, e.g. train.lr=1e-4.")
    section, key = parts
    value = yaml.safe_load(raw) if raw != "" else None
    data.setdefault(section, {})
    if data[section] is None:
        data[section] = {}
    data[section][key] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a nested dict in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value, e.g. train.lr=1e-4.")
        dotted, raw = item.split("=", 1)
        _set_dotted(data, dotted.strip(), raw.strip())
    return data


def load_config(cls: type[ConfigT], path: str | Path | None, overrides: list[str] | None = None) -> ConfigT:
    """Read a YAML file (or start from defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist. "
                              f"Pass an existing YAML file, e.g. configs/quickstart.yaml.")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file '{path}' is not valid YAML: {err}") from err
    apply_overrides(data, overrides or [])
    return from_dict(cls, data)


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable ``section.key: old -> new`` lines for every value that differs."""
    lines = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section) or {}, new.get(section) or {}
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                lines.append(f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return lines


def describe(cls: type) -> str:
    """Markdown table of every key of a config class: key, type, default, meaning."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for section in dataclasses.fields(cls):
        section_cls = _field_types(cls)[section.name]
        for f in dataclasses.fields(section_cls):
            shown = _yaml_inline(f.default)
            rows.append(f"| `{section.name}.{f.name}` | `{shown}` | {f.metadata.get('help', '')} |")
    return "\n".join(rows)


def _yaml_inline(value: Any) -> str:
    if value is None:
        return "null"
    plain = list(value) if isinstance(value, tuple) else value
    return yaml.safe_dump(plain, default_flow_style=True).removesuffix("...\n").strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--describe", action="store_true", help="print every config key as Markdown tables")
    args = parser.parse_args(argv)
    if args.describe:
        print("### Stage 1 (`train_vqgan.py`)\n")
        print(describe(Stage1Config))
        print("\n### Stage 2 (`train_transformer.py`)\n")
        print(describe(Stage2Config))
    else:
        parser.print_help(sys.stdout)


if __name__ == "__main__":
    main()

"""Typed experiment configs: YAML files and dotted command-line overrides -> dataclasses.

A config file has one mapping per section. Each section is a dataclass that lives next to what it
configures (``model`` is :class:`vqgan.model.VQGANConfig`, ``transformer`` is
:class:`transformer.prior.PriorConfig`, ...), so every default exists once; the two stage configs
that group them are :class:`vqgan.config.Stage1Config` and :class:`transformer.config.Stage2Config`,
and each validates its own sections.

This module holds the machinery: YAML and ``section.key=value`` overrides in, dataclasses out
(:func:`load_config`, :func:`from_dict`), the checks that give every config error its wording
(:func:`check_value` and friends) and the ``--describe-config`` table (:func:`describe`). Unknown keys
and values of the wrong type raise :class:`ConfigError` naming the key and the closest valid one.

It also holds the two sections both stages share, ``data`` (:class:`DataConfig`, read by
``dataloader/``) and ``train`` (:class:`TrainConfig`, read by the scripts and :mod:`utils.training`),
with their checks (:func:`validate_data`, which ``dataloader.build_dataset`` calls too, and
:func:`validate_data_and_train`) and the channel counts the data gives a model (:func:`condition_channels`,
:func:`input_channels`). They live here, on the ground floor, because the stage configs in
``vqgan/`` and ``transformer/`` contain them and those packages never import ``dataloader/``; this
module imports none of the packages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, TypeVar, Union

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be turned into a valid config."""


def option(default: Any, help: str) -> Any:
    """A dataclass field with its default and the one-line meaning ``describe`` prints."""
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    name: Literal["builtin", "mnist", "fashion_mnist", "cifar10", "folder"] = option(
        "builtin", "dataset: builtin (procedural, offline), mnist, fashion_mnist, cifar10 or folder")
    root: str = option("data", "where the dataset lives (or is downloaded to); an image folder for name=folder")
    image_size: int = option(32, "images are resized (and center-cropped) to this square size")
    crop_size: Optional[int] = option(
        None, "train on square crops of this size (pixels) of the image_size images: random crops in training, "
              "centre crops in evaluation, the same crop for an image and its condition map; models see crop_size")
    channels: int = option(3, "1 (grayscale) or 3 (RGB); images are converted to this")
    num_workers: int = option(2, "DataLoader worker processes (0 loads in the main process)")
    random_flip: bool = option(False, "random horizontal flips while training")
    class_labels: bool = option(False, "folder datasets: use each image's subfolder as its class")
    download: bool = option(True, "torchvision datasets: download when the files are missing")
    skip_bad_images: bool = option(False, "folder datasets: skip unreadable images with a warning instead of failing")
    num_samples: int = option(20000, "builtin dataset: number of training images")
    num_classes: int = option(10, "builtin dataset: number of classes")
    scene: Literal["scattered", "centred"] = option(
        "scattered", "builtin dataset: scattered (1-3 objects anywhere, random colours, textured backgrounds) or "
                     "centred (one upright object near the centre, eight hues, flat backgrounds)")
    eval_samples: int = option(2000, "number of held-out images used for evaluation")
    condition: Literal["none", "segmentation", "depth", "lowres", "coord"] = option(
        "none", "condition map each image comes with: none, segmentation (label maps), depth, lowres (the image at "
                "1/lowres_factor) or coord (pixel positions)")
    num_labels: int = option(0, "segmentation: number of labels (pixel values 0..num_labels-1); the builtin data has "
                                "num_classes + 1 (0 = background)")
    lowres_factor: int = option(4, "lowres condition: downsampling factor")
    content: Literal["images", "conditions"] = option(
        "images", "what the dataset yields first: the images, or the condition maps (to train a condition tokenizer "
                  "with train_vqgan.py)")


@dataclass
class TrainConfig:
    max_steps: int = option(10000, "optimizer steps to train for")
    batch_size: int = option(32, "images (or sequences) per step per process")
    lr: float = option(2e-4, "peak learning rate")
    betas: tuple[float, float] = option((0.5, 0.9), "Adam betas")
    weight_decay: float = option(0.0, "AdamW weight decay (stage 2: matrices only)")
    warmup_steps: int = option(0, "linear learning-rate warmup steps")
    lr_schedule: Literal["constant", "cosine"] = option("constant", "learning-rate schedule after warmup")
    min_lr_ratio: float = option(0.1, "cosine schedule: final lr as a fraction of lr")
    grad_clip: float = option(1.0, "clip gradient norm to this (0 = off)")
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step")
    ema_decay: float = option(0.0, "EMA of the model weights used for samples and evaluation (0 = off)")
    seed: int = option(0, "random seed")
    device: str = option("auto", "auto (CUDA if available), cpu, cuda or cuda:N")
    precision: Literal["auto", "bf16", "fp32"] = option(
        "auto", "auto = bf16 autocast on CUDA, fp32 on CPU; bf16 also pays on CPUs with AVX512-BF16 or AMX")
    compile: bool = option(False, "wrap models in torch.compile")
    log_every: int = option(50, "steps between metrics.csv rows and progress-bar updates")
    sample_every: int = option(500, "steps between sample grids")
    ckpt_every: int = option(1000, "steps between periodic checkpoints (last.pt is refreshed too)")
    num_sample_images: int = option(8, "images in each sample grid")
    max_bad_steps: int = option(20, "stop after this many consecutive non-finite steps")
    dist_timeout: float = option(600.0, "torchrun: seconds to wait for all processes to join (and for each "
                                        "collective)")


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def check_number(key: str, value: int | float) -> int | float:
    """``value`` itself when it is finite and within the 64-bit integer range every tensor index and seed
    lives in; otherwise a ConfigError naming ``key``. Every number of a config or a command line passes here."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value}.")
    if not INT64_MIN <= value <= INT64_MAX:
        raise ConfigError(f"{key}={value} is out of range: numbers must lie within +-{INT64_MAX:.2e} "
                          f"(64-bit integers).")
    return value


def check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def check_value(key: str, value: Any, ok: bool, allowed: str, example: Any) -> None:
    """Raise ConfigError ``key must be <allowed>, got <value>; e.g. key=<example>`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key} must be {allowed}, got {_yaml_inline(value)}; e.g. {key}={example}.")


def check_fraction(key: str, value: float, example: Any, *, top: bool = False) -> None:
    """``value`` in [0, 1) (or [0, 1] with ``top``)."""
    ok = 0 <= value <= 1 if top else 0 <= value < 1
    check_value(key, value, ok, "in [0, 1]" if top else "in [0, 1)", example)


def check_counts(section: str, config: Any, minimum: dict[str, int], example: dict[str, Any]) -> None:
    """Every key of ``minimum`` in ``config`` (the section ``section``) is an integer of at least its minimum."""
    for key, low in minimum.items():
        value = getattr(config, key)
        allowed = "positive" if low == 1 else "0 or more" if low == 0 else f"at least {low}"
        check_value(f"{section}.{key}", value, value >= low, allowed, example.get(key, max(low, 1)))


DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def training_size(data: DataConfig) -> int:
    """The size of the squares models train on: ``data.crop_size`` when set, else ``data.image_size``."""
    return data.crop_size or data.image_size


def is_cropped(data: DataConfig) -> bool:
    """Whether models see crops of the images (``data.crop_size`` set and below ``data.image_size``)."""
    return data.crop_size is not None and data.crop_size < data.image_size


def validate_data(data: DataConfig) -> None:
    """Raise ConfigError on impossible values of the ``data`` section (also checked when a dataset is built)."""
    check(data.channels in (1, 3), f"data.channels must be 1 or 3, got {data.channels}.")
    check(data.image_size > 0, f"data.image_size must be positive, got {data.image_size}.")
    check_counts("data", data, {"num_workers": 0, "num_samples": 1, "num_classes": 1, "eval_samples": 0,
                                "num_labels": 0, "lowres_factor": 1},
                 {"num_workers": 2, "num_samples": 20000, "num_classes": 10, "eval_samples": 2000, "num_labels": 0,
                  "lowres_factor": 4})
    if data.crop_size is not None:
        check_value("data.crop_size", data.crop_size, 0 < data.crop_size <= data.image_size,
                    f"a size from 1 to data.image_size ({data.image_size}), or null for whole images",
                    data.image_size // 2)
    _validate_condition(data)


# Conditions read from files, and the datasets that have such files (lowres and coord are derived from any image).
_CONDITION_SOURCES = {"segmentation": ("builtin", "folder"), "depth": ("folder",)}


def _validate_condition(data: DataConfig) -> None:
    if data.condition == "lowres":
        check_value("data.lowres_factor", data.lowres_factor, data.image_size % data.lowres_factor == 0,
                    f"a divisor of data.image_size ({data.image_size}) for the lowres condition",
                    next(f for f in (4, 2, 1) if data.image_size % f == 0))
    check(data.content == "images" or data.condition != "none",
          "data.content=conditions yields condition maps, but data.condition is none. Set the condition the "
          "tokenizer is for, e.g. data.condition=segmentation, or data.content=images.")
    sources = _CONDITION_SOURCES.get(data.condition)
    if sources is not None and data.name not in sources:
        builtin = " or data.name=builtin (procedural shapes with label maps)" if "builtin" in sources else ""
        raise ConfigError(f"data.condition={data.condition} needs condition maps that data.name={data.name} does not "
                          f"have. Use data.name=folder with ROOT/images/NAME.ext and ROOT/conditions/NAME.png"
                          f"{builtin}; the lowres and coord conditions work with every dataset.")
    if data.condition == "segmentation":
        if data.name == "builtin":
            labels = data.num_classes + 1
            check(data.num_labels == labels,
                  f"data.num_labels must be data.num_classes + 1 = {labels} for the builtin data's label maps "
                  f"(0 is the background, a shape of class c is label c + 1), got {data.num_labels}; "
                  f"e.g. data.num_labels={labels}.")
        check_value("data.num_labels", data.num_labels, data.num_labels >= 2,
                    "at least 2 for segmentation conditions (the maps' pixel values are labels 0..num_labels-1)", 2)


def condition_channels(data: DataConfig) -> int:
    """Channels of the condition maps as a tokenizer sees them (a segmentation map as a one-hot of its labels)."""
    return {"none": 0, "segmentation": data.num_labels, "depth": 1, "lowres": data.channels, "coord": 1}[data.condition]


def input_channels(data: DataConfig) -> int:
    """Channels of what the dataset yields first: the condition maps or the images (see ``data.content``)."""
    return condition_channels(data) if data.content == "conditions" else data.channels


def validate_data_and_train(data: DataConfig, train: TrainConfig) -> None:
    """Raise ConfigError on impossible values of the sections both stages share."""
    validate_data(data)
    check(train.lr > 0, f"train.lr must be positive, got {train.lr}; typical values are 1e-4 to 5e-4.")
    check(train.max_steps > 0, f"train.max_steps must be positive, got {train.max_steps}.")
    check(train.batch_size > 0, f"train.batch_size must be positive, got {train.batch_size}.")
    check(train.grad_accum >= 1, f"train.grad_accum must be at least 1, got {train.grad_accum}.")
    check(0 <= train.ema_decay < 1, f"train.ema_decay must be in [0, 1), got {train.ema_decay}.")
    check(train.log_every > 0, f"train.log_every must be positive, got {train.log_every}.")
    check(train.max_bad_steps > 0, f"train.max_bad_steps must be positive, got {train.max_bad_steps}.")
    check_value("train.dist_timeout", train.dist_timeout, train.dist_timeout > 0, "positive (seconds)", 600)
    check_counts("train", train, {"warmup_steps": 0, "sample_every": 0, "ckpt_every": 0, "num_sample_images": 1,
                                  "seed": 0},
                 {"warmup_steps": 500, "sample_every": 500, "ckpt_every": 1000, "num_sample_images": 8, "seed": 0})
    for i, beta in enumerate(train.betas):
        check_fraction(f"train.betas[{i}]", beta, "[0.5,0.9]")
    check_fraction("train.min_lr_ratio", train.min_lr_ratio, 0.1, top=True)
    check_value("train.weight_decay", train.weight_decay, train.weight_decay >= 0, "0 or more", 0.01)
    check_value("train.grad_clip", train.grad_clip, train.grad_clip >= 0, "0 (off) or more", 1.0)
    check_value("train.device", train.device, DEVICE_PATTERN.fullmatch(train.device) is not None,
                "auto, cpu, cuda or cuda:N", "cpu")


@contextlib.contextmanager
def building(what: str) -> Iterator[None]:
    """Report a ValueError raised while building ``what`` from the config as a ConfigError.

    Used only around model constructors, whose ValueErrors are about impossible settings.
    """
    try:
        yield
    except ValueError as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"the config describes a {what} that cannot be built: {err}") from err


ConfigT = TypeVar("ConfigT")


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(str(name), options, n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else f" Valid keys: {', '.join(options)}."


def _unknown_key(section: str, key: str, sections: dict[str, Any]) -> str:
    """Why ``section.key`` is unknown: the section where that key lives, else the closest key of ``section``."""
    homes = [name for name, section_cls in sections.items() if key in _field_types(section_cls)]
    dotted = f"{section}.{key}"
    if homes:
        return (f"unknown config key '{dotted}': '{key}' belongs to the {homes[0]} section. "
                f"Did you mean '{homes[0]}.{key}'?")
    valid = [f"{section}.{k}" for k in _field_types(sections[section])]
    return f"unknown config key '{dotted}'.{_closest(dotted, valid)}"


def _unknown_section(cls: type, section: str, sections: dict[str, Any]) -> str:
    """Why ``section`` is unknown: it belongs to the other stage's config, else the closest section."""
    other_stage = getattr(cls, "OTHER_STAGE", {})
    if section in other_stage:
        stage, script, example = other_stage[section]
        return (f"unknown config section '{section}': this looks like a {stage} config (for {script}). "
                f"Pass it to {script}, or give this script a config like {example}.")
    return f"unknown config section '{section}'.{_closest(section, list(sections))}"


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
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return check_number(key, value)
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}.")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads '1e-4' (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(check_number(key, value))
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
            raise ConfigError(_unknown_section(cls, section_name, sections))
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
                raise ConfigError(_unknown_key(section_name, key, sections))
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


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error instead of the last
    one silently winning."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            with contextlib.suppress(TypeError):  # an unhashable key is reported by the base class
                if key in seen:
                    raise ConfigError(f"the key '{key}' appears twice in one mapping (lines {seen[key]} and {line}"
                                      f"{_where(key_node)}); the second would silently replace the first. Keep "
                                      f"one of them.")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _where(node: yaml.Node) -> str:
    name = node.start_mark.name
    return "" if name in ("<unicode string>", "<file>") else f" of {name}"


def parse_yaml(text: str) -> Any:
    """YAML ``text`` with the safe loader, refusing keys given twice."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def _set_dotted(data: dict[str, Any], dotted: str, raw: str) -> None:
    parts = dotted.split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override '{dotted}={raw}' must look like section.key=value, e.g. train.lr=1e-4.")
    section, key = parts
    try:
        value = parse_yaml(raw) if raw != "" else None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"override '{dotted}={raw}': the value is not valid YAML ({problem}). Quote strings and "
                          f"close brackets, e.g. model.ch_mult=[1,2,2].") from None
    if data.get(section) is None:
        data[section] = {}
    if not isinstance(data[section], dict):
        raise ConfigError(f"config section '{section}' must be a mapping of keys, got {data[section]!r}.")
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
        if path.is_dir():
            raise ConfigError(f"config file '{path}' is a folder. Pass a YAML file, e.g. configs/quickstart.yaml.")
        if path.exists() and not path.is_file():
            raise ConfigError(f"config file '{path}' is not a regular file (a pipe, socket or device). Pass a YAML "
                              f"file, e.g. configs/quickstart.yaml.")
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist. "
                              f"Pass an existing YAML file, e.g. configs/quickstart.yaml.")
        try:
            data = parse_yaml(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file '{path}' is not valid YAML: {err}") from err
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"config file '{path}' cannot be read ({err}). Pass a YAML text file, "
                              f"e.g. configs/quickstart.yaml.") from err
        if data is None or data == {}:
            raise ConfigError(f"config file '{path}' holds no settings (it is empty or only comments), so the run "
                              f"would silently use every default. Write the sections you mean (data:, model:, "
                              f"train:, ...), e.g. start from configs/quickstart.yaml.")
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections (data:, train:, ...), but it "
                              f"holds a {type(data).__name__}: {str(data)[:60]!r}. See configs/quickstart.yaml.")
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

"""Read the files taming-transformers publishes, Lightning checkpoints (``.ckpt``) and model configs
(``.yaml``), and turn them into a stage-1 checkpoint of this repository (:func:`import_taming`, behind
``generate.py import-taming``).

The result has the layout ``train_vqgan.py`` writes (kind, config, model, model_config, disc, ...),
so it works wherever a trained stage-1 checkpoint does. The LPIPS VGG16 and linear-head weights
that taming stores inside its checkpoints are written next to it, in the formats
``loss.lpips_vgg_path`` and ``loss.lpips_heads_path`` read.

Neither PyTorch Lightning nor OmegaConf is needed, and no pickled code runs. A Lightning
checkpoint is a ``torch.save`` file whose pickle holds, beside the weights under ``state_dict``,
objects of Lightning and OmegaConf classes (hyper-parameters, callback states). A normal unpickler
imports those classes and calls whatever the file names, so a crafted ``.ckpt`` can run arbitrary
code, and even an honest one needs the exact library versions that wrote it. So we first try
``torch.load(weights_only=True)``; when that refuses the file, :class:`RestrictedUnpickler` reads
it again: tensors (through torch's own rebuild functions, allowed by name) and plain containers
come back as they are, and every other class is replaced by an inert :class:`NotLoaded` stand-in
without being imported or called.
"""

from __future__ import annotations

import pickle
import types
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from utils.checkpoint import CheckpointError, save_checkpoint, training_checkpoint
from utils.config import ConfigError, DataConfig, parse_yaml, to_dict
from vqgan.config import Stage1Config
from vqgan.discriminator import DiscriminatorConfig
from vqgan.loss import LossConfig
from vqgan.model import VQGANConfig
from vqgan.taming import TamingConversion, TamingFormatError, convert_taming_state_dict

ZIP_MAGIC = b"PK\x03\x04"  # torch.save since PyTorch 1.6
LEGACY_MAGIC = b"\x80"  # a pickle (protocol 2+): torch.save's format before 1.6
WEIGHTS_KEY = "state_dict"
FIX_DOWNLOAD = ("Pass the last.ckpt of a taming-transformers VQGAN (for example vqgan_imagenet_f16_16384 from the "
                "links in the taming-transformers README)")

# The only callables a checkpoint may name: torch's tensor rebuilders and plain containers.
ALLOWED = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch", "Size"): torch.Size,
}
if hasattr(torch._utils, "_rebuild_tensor_v3"):
    ALLOWED[("torch._utils", "_rebuild_tensor_v3")] = torch._utils._rebuild_tensor_v3


class TamingFileError(CheckpointError):
    """A file that cannot be read as a taming-transformers checkpoint or config."""


class NotLoaded(dict):
    """Stand-in for an object of a class the restricted reader does not import.

    It accepts whatever the pickle does with an object (construction arguments, state, items) and
    keeps it as inert data; ``origin`` names the class the file asked for.
    """

    origin = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self.args, self.kwargs, self.state, self.items_list = args, kwargs, None, []

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def append(self, item: Any) -> None:
        self.items_list.append(item)

    def extend(self, items: Any) -> None:
        self.items_list.extend(items)

    def __repr__(self) -> str:
        return f"<{self.origin}, not loaded>"


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that never imports: allowed torch/collections callables by name, stand-ins for the rest."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return type(name, (NotLoaded,), {"origin": f"{module}.{name}"})


def _restricted_load(handle: Any, **kwargs: Any) -> Any:
    return RestrictedUnpickler(handle, **kwargs).load()


# What torch.load(pickle_module=...) needs: Unpickler for zip files, load for the legacy format.
RESTRICTED_PICKLE = types.SimpleNamespace(__name__="restricted_pickle", Unpickler=RestrictedUnpickler,
                                          load=_restricted_load)


def load_restricted(path: str | Path) -> Any:
    """``torch.load`` of a file whose pickle may name classes that must not be imported (see module doc)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        pass  # it names classes beyond tensors and containers: read it again without importing them
    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=RESTRICTED_PICKLE)


def read_taming_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights of a taming-transformers checkpoint and its ``epoch``/``global_step`` (when stored).

    Accepts a Lightning checkpoint (weights under ``state_dict``) or a bare state dict. Raises
    :class:`TamingFileError` naming the file and the fix for anything else.
    """
    path = Path(path)
    if not path.is_file():
        raise TamingFileError(f"taming checkpoint '{path}' does not exist. {FIX_DOWNLOAD}.")
    with open(path, "rb") as handle:
        head = handle.read(len(ZIP_MAGIC))
    if head != ZIP_MAGIC and not head.startswith(LEGACY_MAGIC):
        what = "is empty" if not head else "is not a file written by torch.save"
        raise TamingFileError(f"'{path}' {what}, so it is not a taming-transformers checkpoint. {FIX_DOWNLOAD}.")
    try:
        loaded = load_restricted(path)
    except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile, OSError, pickle.UnpicklingError,
            AttributeError, TypeError, IndexError) as err:
        raise TamingFileError(
            f"'{path}' is truncated or corrupt and cannot be read ({str(err).splitlines()[0] if str(err) else err!r})."
            f" Download it again (its size should match the published file).") from err
    if isinstance(loaded, dict) and "kind" in loaded and "model" in loaded:
        raise TamingFileError(f"'{path}' is a checkpoint of this repository (kind '{loaded['kind']}'), not a "
                              f"taming-transformers one, so it needs no import: pass it directly to generate.py, "
                              f"train_transformer.py --vqgan or train.init_from.")
    weights = loaded.get(WEIGHTS_KEY) if isinstance(loaded, dict) else None
    if weights is None and isinstance(loaded, dict) and "encoder.conv_in.weight" in loaded:
        weights = loaded  # a bare state dict
    if not isinstance(weights, dict) or not any(isinstance(v, torch.Tensor) for v in weights.values()):
        keys = ", ".join(map(str, list(loaded)[:8])) if isinstance(loaded, dict) else type(loaded).__name__
        raise TamingFileError(f"'{path}' is a PyTorch file but not a taming-transformers checkpoint: it has no "
                              f"'{WEIGHTS_KEY}' of tensors (found: {keys}). {FIX_DOWNLOAD}.")
    info = {key: loaded[key] for key in ("epoch", "global_step") if isinstance(loaded.get(key), int)}
    return {str(k): v for k, v in weights.items() if isinstance(v, torch.Tensor)}, info


def read_taming_config(path: str | Path) -> dict[str, Any]:
    """The ``model`` section of a taming-transformers YAML config (``target``, ``params.ddconfig``, ...)."""
    path = Path(path)
    if not path.is_file():
        raise TamingFileError(f"taming config '{path}' does not exist. Pass the model.yaml published with the "
                              f"checkpoint, or leave out --config (the architecture is read from the weights).")
    try:
        data = parse_yaml(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError, ConfigError) as err:
        raise TamingFileError(f"taming config '{path}' is not valid YAML: {err}") from err
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("params"), dict):
        raise TamingFileError(f"'{path}' is not a taming-transformers model config: it has no model.params section "
                              f"(with ddconfig, n_embed, embed_dim). Pass the model.yaml published with the "
                              f"checkpoint, or leave out --config.")
    return model


KIND = "vqgan"
DEFAULT_RESOLUTION = 256
# Loss settings of taming's VQLPIPSWithDiscriminator that have a key here, with their taming names.
TAMING_LOSS_KEYS = {"disc_start": "disc_start", "disc_weight": "disc_weight", "codebook_weight": "codebook_weight",
                    "perceptual_weight": "perceptual_weight", "pixelloss_weight": "rec_weight",
                    "disc_loss": "disc_loss"}


@dataclass
class ImportedFiles:
    checkpoint: Path
    lpips_vgg: Path | None
    lpips_heads: Path | None


def lpips_paths(out: Path) -> tuple[Path, Path]:
    """Where the LPIPS weights go: beside ``out``, named after it."""
    return out.with_name(f"{out.stem}.lpips_vgg.pth"), out.with_name(f"{out.stem}.lpips_heads.pth")


def stage1_config(conversion: TamingConversion, lpips: tuple[Path | None, Path | None],
                  model_config: dict[str, Any] | None) -> Stage1Config:
    """A complete, valid stage-1 config describing the converted model (and taming's loss settings)."""
    args = conversion.model_args
    model = VQGANConfig(**{key: args[key] for key in VQGANConfig.__dataclass_fields__})
    disc_args = conversion.disc_args or {}
    disc = DiscriminatorConfig(**{key: disc_args[key] for key in DiscriminatorConfig.__dataclass_fields__
                                  if key in disc_args})
    loss = LossConfig(lpips_vgg_path=None if lpips[0] is None else str(lpips[0]),
                      lpips_heads_path=None if lpips[1] is None else str(lpips[1]))
    loss_params = (((model_config or {}).get("params") or {}).get("lossconfig") or {}).get("params") or {}
    for taming_key, key in TAMING_LOSS_KEYS.items():
        if taming_key in loss_params:
            setattr(loss, key, type(getattr(loss, key))(loss_params[taming_key]))
    data = DataConfig(name="folder", image_size=args["resolution"], channels=args["in_channels"])
    config = Stage1Config(data=data, model=model, disc=disc, loss=loss)
    config.validate()
    return config


def import_taming(checkpoint: str | Path, out: str | Path, resolution: int | None = None,
                  config: str | Path | None = None, force: bool = False) -> tuple[ImportedFiles, list[str]]:
    """Convert ``checkpoint`` and write ``out`` (plus LPIPS files); returns the files and lines to print.

    Everything is read and checked before the first file is written, so a failure writes nothing.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    taming_model = read_taming_config(config) if config is not None else None
    if resolution is None:
        dd = taming_model["params"].get("ddconfig") if taming_model else None
        resolution = int(dd.get("resolution", DEFAULT_RESOLUTION)) if isinstance(dd, dict) else DEFAULT_RESOLUTION
    weights, info = read_taming_checkpoint(checkpoint)
    try:
        conversion = convert_taming_state_dict(weights, resolution, taming_model)
    except TamingFormatError as err:
        where = f"'{checkpoint}'" + (f" (checked against '{config}')" if config is not None else "")
        fix = ("Pass the config published with this checkpoint, or leave out --config." if config is not None
               else "Pass a taming-transformers VQGAN checkpoint (VQModel).")
        raise TamingFileError(f"{where} {err}. {fix}") from err
    vgg_path, heads_path = lpips_paths(out)
    lpips = (vgg_path if conversion.lpips_vgg else None, heads_path if conversion.lpips_heads else None)
    cfg = stage1_config(conversion, lpips, taming_model)
    existing = [str(path) for path in (out, *lpips) if path is not None and path.exists()]
    if existing and not force:
        raise TamingFileError(f"{' and '.join(existing)} already exist; pass another --out or add --force to "
                              f"overwrite.")
    state = training_checkpoint(
        KIND, int(info.get("global_step", 0)), to_dict(cfg), model=conversion.model_state,
        model_config=conversion.model_args, disc=conversion.disc_state, ema=None, opt_ae=None, opt_disc=None,
        lecam=None, imported_from={"format": "taming-transformers", "file": checkpoint.name, **info})
    if lpips[0] is not None:
        save_checkpoint(conversion.lpips_vgg, vgg_path)
    if lpips[1] is not None:
        save_checkpoint(conversion.lpips_heads, heads_path)
    save_checkpoint(state, out)
    return ImportedFiles(out, *lpips), summary(conversion, cfg, out, lpips, info)


def summary(conversion: TamingConversion, cfg: Stage1Config, out: Path, lpips: tuple[Path | None, Path | None],
            info: dict[str, Any]) -> list[str]:
    m = cfg.model
    side = cfg.data.image_size // 2 ** (len(m.ch_mult) - 1)
    lines = [f"wrote {out}: VQGAN ch {m.ch}, ch_mult {list(m.ch_mult)}, {m.num_res_blocks} res blocks, attention "
             f"at {list(m.attn_resolutions)}, z {m.z_channels}, {m.codebook_size} codes of dim {m.embed_dim}; "
             f"{cfg.data.image_size}x{cfg.data.image_size} images -> {side}x{side} tokens"
             + (f" (taming step {info['global_step']})" if "global_step" in info else "")]
    if conversion.disc_state is not None:
        lines.append(f"  discriminator: PatchGAN, {cfg.disc.n_layers} layers, ndf {cfg.disc.ndf}")
    else:
        lines.append("  no discriminator in the file: train.init_from will start one from scratch")
    if lpips[0] is not None or lpips[1] is not None:
        lines.append("  LPIPS weights for fine-tuning with the perceptual loss, use these overrides:")
        lines.append("    " + " ".join(f"loss.lpips_{name}_path={path}" for name, path in zip(("vgg", "heads"), lpips)
                                       if path is not None))
    if conversion.ignored:
        shown = ", ".join(conversion.ignored[:5]) + (" ..." if len(conversion.ignored) > 5 else "")
        lines.append(f"  not used: {len(conversion.ignored)} tensors ({shown})")
    return lines

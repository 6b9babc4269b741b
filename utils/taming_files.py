"""Read the files taming-transformers publishes: Lightning checkpoints (``.ckpt``) and model configs
(``.yaml``). :mod:`vqgan.taming_import` turns a VQGAN's into a stage-1 checkpoint of this repository,
:mod:`transformer.taming_import` a transformer's into a stage-2 one.

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

from utils.checkpoint import CheckpointError
from utils.config import ConfigError, parse_yaml

ZIP_MAGIC = b"PK\x03\x04"  # torch.save since PyTorch 1.6
LEGACY_MAGIC = b"\x80"  # a pickle (protocol 2+): torch.save's format before 1.6
WEIGHTS_KEY = "state_dict"
BARE_KEYS = ("encoder.conv_in.weight", "transformer.tok_emb.weight")  # a VQGAN's or a Net2NetTransformer's
FIX_DOWNLOAD = ("Pass the last.ckpt of a taming-transformers VQGAN or transformer (for example "
                "vqgan_imagenet_f16_16384 or cin_transformer from the links in the taming-transformers README)")

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
        use = ("generate.py sample or complete" if loaded["kind"] == "transformer"
               else "generate.py, train_transformer.py --vqgan or train.init_from")
        raise TamingFileError(f"'{path}' is a checkpoint of this repository (kind '{loaded['kind']}'), not a "
                              f"taming-transformers one, so it needs no import: pass it directly to {use}.")
    weights = loaded.get(WEIGHTS_KEY) if isinstance(loaded, dict) else None
    if weights is None and isinstance(loaded, dict) and any(key in loaded for key in BARE_KEYS):
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


@dataclass
class TamingSource:
    """A taming checkpoint as read: its path, weights and ``epoch``/``global_step``, and the ``model`` section of
    its config (with the config's path) when one was given."""

    checkpoint: Path
    weights: dict[str, torch.Tensor]
    info: dict[str, Any]
    config: Path | None = None
    model: dict[str, Any] | None = None

    def where(self) -> str:
        """The files, as error messages name them."""
        return f"'{self.checkpoint}'" + (f" (checked against '{self.config}')" if self.config is not None else "")


def read_taming(checkpoint: str | Path, config: str | Path | None = None) -> TamingSource:
    """Read a taming checkpoint and, when given, its config (the config first: it is small and fails fast)."""
    model = read_taming_config(config) if config is not None else None
    weights, info = read_taming_checkpoint(checkpoint)
    return TamingSource(Path(checkpoint), weights, info, None if config is None else Path(config), model)

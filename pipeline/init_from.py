"""``train.init_from``: start a new stage-1 run from the weights of an existing stage-1 checkpoint."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from utils.checkpoint import CheckpointError, load_checkpoint, load_state_dict_checked
from utils.config import Stage1Config, config_diff, to_dict

# Config values that decide which weights exist and their shapes.
SHAPE_KEYS = {
    "data": ("channels",),
    "model": ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "codebook_size", "embed_dim",
              "codebook_dim", "ema", "usage_window"),
    "disc": ("ndf", "n_layers", "norm"),
}


def init_from_checkpoint(path: str | Path, model: nn.Module, disc: nn.Module, cfg: Stage1Config,
                         verbose: bool = True) -> str:
    """Load the autoencoder (EMA weights when the run kept them) and discriminator weights of ``path``.

    Optimizers, step and RNG are not taken: the caller starts a new run. A checkpoint without a
    discriminator leaves ``disc`` as built. Raises :class:`CheckpointError` when the shapes do not
    fit ``cfg``, listing the config values that differ. Returns (and with ``verbose`` prints) a line
    describing what was loaded.
    """
    state = load_checkpoint(path, kind="vqgan")
    source = f"train.init_from={path}"
    try:
        load_state_dict_checked(model, state.get("ema") or state["model"], source)
        if state.get("disc") is not None:
            load_state_dict_checked(disc, state["disc"], f"{source} (discriminator)")
    except CheckpointError as err:
        differences = config_diff(_shape_values(state.get("config") or {}), _shape_values(to_dict(cfg)))
        hint = ("\nConfig values that differ (checkpoint -> this config): " + "; ".join(differences)
                if differences else "")
        raise CheckpointError(f"{err}{hint}\nFor train.init_from the config's model and disc sections must "
                              f"describe the checkpoint's networks (for taming's ImageNet VQGANs: "
                              f"configs/imagenet_f16_1024.yaml or configs/imagenet_f16_16384.yaml).") from err
    disc_note = "discriminator too" if state.get("disc") is not None else "no discriminator in it: a new one"
    line = f"initialised from {path} (step {state.get('step', 0)}; {disc_note}); optimizers start fresh"
    if verbose:
        print(line)
    return line


def _shape_values(config: dict) -> dict[str, dict]:
    """The values of ``SHAPE_KEYS`` in a config dict, by section."""
    return {section: {key: (config.get(section) or {}).get(key) for key in keys}
            for section, keys in SHAPE_KEYS.items()}

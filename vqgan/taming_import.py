"""Turn a taming-transformers VQGAN checkpoint into a stage-1 checkpoint of this repository
(:func:`import_taming`, behind ``generate.py import-taming``).

The result has the layout ``train_vqgan.py`` writes (kind, config, model, model_config, disc, ...),
so it works wherever a trained stage-1 checkpoint does. The LPIPS VGG16 and linear-head weights
that taming stores inside its checkpoints are written next to it, in the formats
``loss.lpips_vgg_path`` and ``loss.lpips_heads_path`` read. The files are read by
:mod:`utils.taming_files` (without running pickled code) and the weights renamed by
:func:`vqgan.taming.convert_taming_state_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.checkpoint import save_checkpoint, training_checkpoint
from utils.config import DataConfig, to_dict
from utils.taming_files import TamingFileError, TamingSource
from vqgan.config import Stage1Config
from vqgan.discriminator import DiscriminatorConfig, logit_map_size
from vqgan.loss import LossConfig
from vqgan.model import VQGANConfig
from vqgan.taming import TamingConversion, TamingFormatError, convert_taming_state_dict

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
    disc_args = conversion.disc_args or {"n_layers": fitting_disc_layers(args["resolution"])}
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
    config.validate_description()
    return config


def fitting_disc_layers(resolution: int) -> int:
    """The default discriminator depth, or less where images of ``resolution`` are too small for it: the
    discriminator a file without one gets (train.init_from starts it from scratch)."""
    layers = DiscriminatorConfig.n_layers
    while layers > 1 and logit_map_size(resolution, layers) < 1:
        layers -= 1
    return layers


def default_resolution(model_config: dict[str, Any] | None) -> int:
    """The image size of a taming ``model`` config section (``params.ddconfig.resolution``), else 256."""
    dd = ((model_config or {}).get("params") or {}).get("ddconfig")
    return int(dd.get("resolution", DEFAULT_RESOLUTION)) if isinstance(dd, dict) else DEFAULT_RESOLUTION


def import_taming(source: TamingSource, out: str | Path, resolution: int | None = None,
                  force: bool = False) -> tuple[ImportedFiles, list[str]]:
    """Convert the VQGAN of ``source`` and write ``out`` (plus LPIPS files); returns the files and lines to print.

    Everything is checked before the first file is written, so a failure writes nothing.
    """
    out = Path(out)
    resolution = resolution or default_resolution(source.model)
    try:
        conversion = convert_taming_state_dict(source.weights, resolution, source.model)
    except TamingFormatError as err:
        fix = ("Pass the config published with this checkpoint, or leave out --config." if source.config is not None
               else "Pass a taming-transformers VQGAN checkpoint (VQModel or GumbelVQ).")
        raise TamingFileError(f"{source.where()} {err}. {fix}") from err
    checkpoint, info = source.checkpoint, source.info
    vgg_path, heads_path = lpips_paths(out)
    lpips = (vgg_path if conversion.lpips_vgg else None, heads_path if conversion.lpips_heads else None)
    cfg = stage1_config(conversion, lpips, source.model)
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
    quantizer = (" (Gumbel quantizer: each vector takes its most likely code, where taming samples one)"
                 if m.quantizer == "gumbel" else "")
    lines = [f"wrote {out}: VQGAN ch {m.ch}, ch_mult {list(m.ch_mult)}, {m.num_res_blocks} res blocks, attention "
             f"at {list(m.attn_resolutions)}, z {m.z_channels}, {m.codebook_size} codes of dim {m.embed_dim}; "
             f"{cfg.data.image_size}x{cfg.data.image_size} images -> {side}x{side} tokens{quantizer}"
             + (f" (taming step {info['global_step']})" if "global_step" in info else "")]
    if conversion.disc_state is not None:
        lines.append(f"  discriminator: PatchGAN, {cfg.disc.n_layers} layers, ndf {cfg.disc.ndf}")
    elif m.quantizer == "nearest":
        lines.append("  no discriminator in the file: train.init_from will start one from scratch")
    if m.quantizer == "gumbel":
        lines.append("  not trained here (model.quantizer=gumbel): use it to reconstruct, tokenize, or as a prior's "
                     "first stage")
    if lpips[0] is not None or lpips[1] is not None:
        lines.append("  LPIPS weights for fine-tuning with the perceptual loss, use these overrides:")
        lines.append("    " + " ".join(f"loss.lpips_{name}_path={path}" for name, path in zip(("vgg", "heads"), lpips)
                                       if path is not None))
    if conversion.ignored:
        shown = ", ".join(conversion.ignored[:5]) + (" ..." if len(conversion.ignored) > 5 else "")
        lines.append(f"  not used: {len(conversion.ignored)} tensors ({shown})")
    return lines

"""Turn a taming-transformers checkpoint into a checkpoint of this repository (behind ``generate.py
import-taming``): a transformer (``Net2NetTransformer``) into a stage-2 checkpoint, a VQGAN into a stage-1 one
(:mod:`vqgan.taming_import`).

The stage-2 checkpoint has the layout ``train_transformer.py`` writes (kind, config, model, prior_config, vqgan,
vqgan_config, cond_vqgan, cond_vqgan_config), so ``generate.py sample`` and ``complete`` use it directly. Its
first stage, and a VQGAN condition stage, go through the stage-1 conversion (:mod:`vqgan.taming`); the GPT
through :mod:`transformer.taming`. A transformer needs its config (``--config model.yaml``): only the config
says what the condition stage is and how many attention heads the GPT has.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from transformer.config import Stage2Config
from transformer.prior import PriorConfig, VQGANPrior
from transformer.taming import (
    COND_PREFIX,
    FIRST_PREFIX,
    GPT_PREFIX,
    TamingCondition,
    convert_gpt,
    gpt_shape,
    is_taming_transformer,
    part,
    read_condition,
)
from utils.checkpoint import save_checkpoint, training_checkpoint
from utils.config import ConfigError, DataConfig, to_dict
from utils.taming_files import TamingFileError, TamingSource, read_taming
from vqgan.model import VQGAN
from vqgan.taming import TamingConversion, TamingFormatError, convert_taming_state_dict
from vqgan.taming_import import default_resolution, import_taming

KIND = "transformer"
FIX_CONFIG = "Pass the config published with this checkpoint (configs/*-project.yaml in its folder) as --config."
FIX_FORMAT = ("Check that --config is the config published with this checkpoint; what the message names has no "
              "counterpart here otherwise.")


def import_taming_checkpoint(checkpoint: str | Path, out: str | Path, resolution: int | None = None,
                             config: str | Path | None = None, force: bool = False) -> list[str]:
    """Convert a taming VQGAN or transformer checkpoint and write ``out``; returns the lines to print."""
    source = read_taming(checkpoint, config)
    if is_taming_transformer(source.weights):
        return import_taming_prior(source, Path(out), resolution, force)
    return import_taming(source, out, resolution, force)[1]


def import_taming_prior(source: TamingSource, out: Path, resolution: int | None = None,
                        force: bool = False) -> list[str]:
    """Convert the ``Net2NetTransformer`` of ``source`` and write the stage-2 checkpoint ``out``; returns the lines
    to print. Everything is checked before the file is written, so a failure writes nothing."""
    if source.model is None:
        raise TamingFileError(f"{source.where()} holds a taming transformer (Net2NetTransformer), whose condition "
                              f"stage and number of attention heads only its config says. {FIX_CONFIG}")
    try:
        prior, condition, stages = _build_prior(source, resolution)
    except TamingFormatError as err:
        raise TamingFileError(f"{source.where()} {err}. {FIX_FORMAT}") from err
    cfg = stage2_config(prior, condition)
    if out.exists() and not force:
        raise TamingFileError(f"{out} already exists; pass another --out or add --force to overwrite.")
    first, cond = stages
    parts = {} if cond is None else {"cond_vqgan": cond.model_state, "cond_vqgan_config": cond.model_args}
    state = training_checkpoint(
        KIND, int(source.info.get("global_step", 0)), to_dict(cfg), model=prior.gpt.state_dict(),
        prior_config=prior.prior_config, ema=None, vqgan=first.model_state, vqgan_config=first.model_args,
        optimizer=None, imported_from={"format": "taming-transformers", "file": source.checkpoint.name,
                                       "condition_stage": condition.target, **source.info}, **parts)
    save_checkpoint(state, out)
    return summary(prior, condition, out, source)


def _stage(weights: dict[str, torch.Tensor], resolution: int, config: Any, labels: bool,
           what: str) -> TamingConversion:
    try:
        return convert_taming_state_dict(weights, resolution, config if isinstance(config, dict) else None, labels)
    except TamingFormatError as err:
        raise TamingFormatError(f"has a {what} that does not convert: it {err}") from err


def _build_prior(source: TamingSource,
                 resolution: int | None) -> tuple[VQGANPrior, TamingCondition,
                                                  tuple[TamingConversion, TamingConversion | None]]:
    """The converted prior (GPT weights loaded), its condition and the converted first and condition stages."""
    params = source.model.get("params") or {}
    target = str(source.model.get("target", ""))
    if target and not target.endswith(".Net2NetTransformer"):
        raise TamingFormatError(f"holds a transformer, but the config describes {target}, not a Net2NetTransformer")
    gpt_params = params.get("transformer_config") or {}
    if str(gpt_params.get("target", "")) not in ("", "taming.modules.transformer.mingpt.GPT"):
        raise TamingFormatError(f"has the transformer {gpt_params['target']}; only taming's minGPT "
                                f"(taming.modules.transformer.mingpt.GPT) converts")
    first_config = params.get("first_stage_config")
    resolution = resolution or default_resolution(first_config if isinstance(first_config, dict) else None)
    cond_weights = part(source.weights, COND_PREFIX)
    condition = read_condition(params, cond_weights)
    first = _stage(part(source.weights, FIRST_PREFIX), resolution, first_config, False, "first stage")
    cond = None
    if condition.stage == "cond":
        cond = _stage(cond_weights, resolution, params.get("cond_stage_config"), condition.labels, "condition stage")
    elif condition.stage == "first":
        cond = first
    vqgan = VQGAN.from_model_config(first.model_args)
    vqgan.load_state_dict(first.model_state)
    if condition.kind == "coord" and condition.coord_factor != vqgan.downsample_factor:
        raise TamingFormatError(f"has a CoordStage of down_factor {condition.coord_factor}, but its first stage "
                                f"downsamples by {vqgan.downsample_factor}; coordinates convert only per image token")
    cond_vqgan = None
    if cond is not None:
        cond_vqgan = VQGAN.from_model_config(cond.model_args)
        cond_vqgan.load_state_dict(cond.model_state)
    gpt = part(source.weights, GPT_PREFIX)
    shape = gpt_shape(gpt, gpt_params.get("params") or {})
    options = PriorConfig(n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["n_embd"],
                          dropout=shape["dropout"], positions="learned", condition=condition.kind,
                          condition_dropout=0.0, pkeep=float(params.get("pkeep", 1.0)),
                          coord_levels=condition.coord_levels or PriorConfig.coord_levels)
    try:
        prior = VQGANPrior(vqgan, options, condition.num_classes, cond_vqgan=cond_vqgan)
    except ValueError as err:
        raise TamingFormatError(f"describes a prior that cannot be built: {err}") from err
    vocab, needed = int(gpt["tok_emb.weight"].shape[0]), prior.condition.vocab_size
    if needed > vocab + (condition.kind == "coord"):  # the top coordinate id may lack a row (see convert_gpt)
        raise TamingFormatError(f"has a GPT vocabulary of {vocab} tokens, but its {condition.kind} condition has "
                                f"{needed} tokens, which taming embeds with the same rows")
    weights = convert_gpt(gpt, codebook_size=prior.codebook_size, condition_vocab=needed,
                          block_size=prior.gpt.block_size,
                          null_row=condition.sos_token if condition.kind == "none" else None)
    try:
        prior.gpt.load_state_dict({key: value.detach().clone() for key, value in weights.items()})
    except RuntimeError as err:
        raise TamingFormatError(f"has GPT tensors that do not fit the architecture they describe ({err})") from err
    return prior.eval(), condition, (first, cond)


def stage2_config(prior: VQGANPrior, condition: TamingCondition) -> Stage2Config:
    """A complete, valid stage-2 config describing the converted prior (folder data of its image size)."""
    maps = condition.kind not in ("none", "class")
    labels = prior.cond_vqgan.num_labels if prior.cond_vqgan is not None else 0
    data = DataConfig(name="folder", image_size=prior.vqgan.resolution, channels=prior.vqgan.in_channels,
                      condition=condition.kind if maps else "none", num_labels=labels)
    cfg = Stage2Config(data=data, transformer=prior.options)
    try:
        cfg.validate()
    except ConfigError as err:
        raise TamingFileError(f"the converted prior has no valid stage-2 config: {err}") from err
    return cfg


def summary(prior: VQGANPrior, condition: TamingCondition, out: Path, source: TamingSource) -> list[str]:
    """What was written, and what differs from taming's model."""
    h, w = prior.latent_size
    g = prior.gpt
    what = {"none": f"unconditional (taming's start token {condition.sos_token} is the null token)",
            "class": f"class-conditional, {prior.num_classes} classes",
            "coord": f"coordinates, {prior.options.coord_levels} levels"}.get(
                condition.kind, f"{condition.kind} maps, {prior.prefix_len} tokens of a {prior.condition.vocab_size}-"
                                f"code tokenizer")
    lines = [f"wrote {out}: GPT prior, {g.n_layer} layers, {g.n_head} heads, width {g.n_embd}; "
             f"{prior.vqgan.resolution}x{prior.vqgan.resolution} images -> {h}x{w} tokens of {prior.codebook_size} "
             f"codes; {what}" + (f" (taming step {source.info['global_step']})" if "global_step" in source.info
                                 else "")]
    vocab = source.weights[GPT_PREFIX + "tok_emb.weight"].shape[0]
    if vocab > prior.codebook_size:
        lines.append(f"  taming's GPT predicts {vocab} ids, of which only the first {prior.codebook_size} are codes; "
                     f"this prior predicts codes only (the codes' logits are taming's)")
    if prior.conditional:
        lines.append("  classifier-free guidance was never trained by taming: sample with --cfg-scale 1 (the default)")
    return lines

"""Weights of taming-transformers' ``Net2NetTransformer`` -> this package's prior: what its config says about the
condition, and the GPT renamed into the token layout of :mod:`transformer.prior`. Pure functions (no files).

Taming's minGPT (``taming/modules/transformer/mingpt.py``) computes what :class:`transformer.gpt.GPT` does with
learned positions; only names and layouts differ:

* ``blocks.{i}.attn.query / key / value`` (three Linear layers) -> one ``attn.qkv``, concatenated q, k, v;
* ``blocks.{i}.ln1 / ln2`` -> ``ln_1 / ln_2``; ``mlp.0 / mlp.2`` -> ``mlp.fc / mlp.proj``;
* ``pos_emb`` [1, block_size, C] -> ``pos_emb.weight``, the first ``L + h*w - 1`` rows the sequence uses;
* ``tok_emb``: taming's condition tokens and image codes share rows (token ``t`` is row ``t`` for both); here
  condition token ``t`` is row ``K + t``, so the table becomes taming's rows ``0 .. K-1`` (codes), its rows
  ``0 .. M-1`` again (condition tokens) and a null row: taming's ``sos_token`` row for an unconditional
  model (there the null token is the start token), and for a conditional one the mean of the condition rows.
  The null token of a conditional prior is used only by classifier-free guidance, which taming never trained,
  so the converted prior keeps ``condition_dropout`` at 0 and guidance (``cfg_scale`` != 1) has no trained
  meaning;
* ``head`` (no bias) -> its rows ``0 .. K-1``: the prior predicts image codes only. A taming vocabulary larger
  than the codebook gives logits for ids that are not codes (taming could sample them, and then fail to decode
  them); they are dropped, so the codes' logits are unchanged and sampling stays among codes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from vqgan.taming import TamingFormatError, UnsupportedTamingModel

GPT_PREFIX = "transformer."
FIRST_PREFIX = "first_stage_model."
COND_PREFIX = "cond_stage_model."
GPT_TARGET = "taming.modules.transformer.mingpt.GPT"
IDENTITY_PERMUTER = "taming.modules.transformer.permuter.Identity"
# taming's cond_stage_key of a VQGAN condition stage -> this package's condition kind
MAP_KEYS = {"depth": "depth", "segmentation": "segmentation"}
BLOCK_NAMES = {"ln1": "ln_1", "ln2": "ln_2", "attn.proj": "attn.proj", "mlp.0": "mlp.fc", "mlp.2": "mlp.proj"}


@dataclass
class TamingCondition:
    """What a taming transformer's sequence starts with, in this package's terms.

    ``kind`` is a :data:`transformer.conditions.ConditionKind`; ``stage`` says where the weights of a condition
    tokenizer are (``cond`` for ``cond_stage_model.*``, ``first`` when taming uses the first stage itself, None
    without one); ``labels`` marks a segmentation tokenizer. ``sos_token`` is the start token of an unconditional
    model, ``num_classes`` the classes of a class-conditional one, ``coord_levels`` and ``coord_factor`` the levels
    and the pixels per token (``n_embed``, ``down_factor``) of a coordinate one; ``target`` names taming's stage.
    """

    kind: str
    target: str
    stage: str | None = None
    labels: bool = False
    sos_token: int = 0
    num_classes: int = 0
    coord_levels: int = 0
    coord_factor: int = 0


def is_taming_transformer(state: dict[str, torch.Tensor]) -> bool:
    """Whether a taming state dict holds a ``Net2NetTransformer`` (a GPT beside its first stage)."""
    return any(key.startswith(GPT_PREFIX) for key in state)


def part(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix``, with the prefix removed."""
    return {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}


def _target(config: Any) -> str:
    return str(config.get("target", "")) if isinstance(config, dict) else str(config)


def _params(config: Any) -> dict[str, Any]:
    params = config.get("params") if isinstance(config, dict) else None
    return params if isinstance(params, dict) else {}


def read_condition(params: dict[str, Any], cond_weights: dict[str, torch.Tensor]) -> TamingCondition:
    """The condition of a ``Net2NetTransformer`` from its config's ``model.params`` (and whether the file has
    condition-stage weights). Raises :class:`UnsupportedTamingModel` for what has no counterpart here."""
    permuter = _target(params.get("permuter_config") or {"target": IDENTITY_PERMUTER})
    if permuter != IDENTITY_PERMUTER:
        raise UnsupportedTamingModel(f"orders its tokens with the permuter {permuter}; only the raster order "
                                     f"({IDENTITY_PERMUTER}) converts, as this package's priors use raster order")
    if int(params.get("downsample_cond_size", -1)) != -1:
        raise UnsupportedTamingModel(f"resizes its condition maps to {params['downsample_cond_size']} pixels before "
                                     f"tokenizing them (downsample_cond_size); only models that tokenize the maps "
                                     f"at the image's size convert")
    cond = params.get("cond_stage_config")
    target, cond_params = _target(cond), _params(cond)
    sos_token = int(params.get("sos_token", 0))
    key = str(params.get("cond_stage_key", ""))
    if params.get("unconditional") or target == "__is_unconditional__" or target.endswith(".SOSProvider"):
        return TamingCondition("none", target, sos_token=int(cond_params.get("sos_token", sos_token)))
    if target.endswith(".Labelator"):
        if "n_classes" not in cond_params:
            raise TamingFormatError("has a Labelator condition stage without n_classes in its config")
        return TamingCondition("class", target, num_classes=int(cond_params["n_classes"]))
    if target.endswith(".CoordStage"):
        return TamingCondition("coord", target, coord_levels=int(cond_params.get("n_embed", 0)),
                               coord_factor=int(cond_params.get("down_factor", 0)))
    if target == "__is_first_stage__":
        return TamingCondition(MAP_KEYS.get(key, "lowres"), target, stage="first")
    if target.endswith(".VQSegmentationModel"):
        return TamingCondition("segmentation", target, stage="cond", labels=True)
    if target.endswith((".VQModel", ".GumbelVQ")):
        if not cond_weights:
            raise TamingFormatError(f"has a {target} condition stage in its config but no cond_stage_model tensors")
        channels = cond_weights["encoder.conv_in.weight"].shape[1] if "encoder.conv_in.weight" in cond_weights else 0
        kind = MAP_KEYS.get(key, "depth" if channels == 1 else "lowres")
        if kind == "segmentation":
            raise TamingFormatError(f"has cond_stage_key segmentation but a {target} condition stage; taming's "
                                    f"segmentation tokenizers are VQSegmentationModel")
        return TamingCondition(kind, target, stage="cond")
    raise UnsupportedTamingModel(
        f"has the condition stage {target or cond!r}, which has no counterpart here; these convert: a VQGAN "
        f"(taming.models.vqgan.VQModel: depth or a low-res image), a segmentation VQGAN (VQSegmentationModel), a "
        f"class (taming.modules.util.Labelator), none (SOSProvider) and coordinates "
        f"(taming.modules.misc.coord.CoordStage)")


def gpt_shape(gpt: dict[str, torch.Tensor], params: dict[str, Any]) -> dict[str, int]:
    """``n_layer``, ``n_embd``, ``vocab_size`` and ``block_size`` of taming's GPT weights (``transformer.*``,
    prefix removed), checked against its config (``transformer_config.params``), with ``n_head`` and
    ``dropout`` from the config: the weights cannot say how many heads split them."""
    for name in ("tok_emb.weight", "pos_emb", "head.weight", "ln_f.weight"):
        if name not in gpt:
            raise TamingFormatError(f"has no tensor 'transformer.{name}', which taming's GPT has")
    vocab, n_embd = gpt["tok_emb.weight"].shape
    found = {"n_layer": len({int(m.group(1)) for key in gpt if (m := re.match(r"blocks\.(\d+)\.", key))}),
             "n_embd": int(n_embd), "vocab_size": int(vocab), "block_size": int(gpt["pos_emb"].shape[1])}
    wrong = [f"{key}: config {params[key]!r}, tensors {value!r}" for key, value in found.items()
             if key in params and int(params[key]) != value]
    if wrong:
        raise TamingFormatError("has a GPT that does not match the config's transformer_config: " + "; ".join(wrong))
    if int(params.get("n_unmasked", 0)):
        raise UnsupportedTamingModel(f"lets its first {params['n_unmasked']} tokens attend both ways (n_unmasked); "
                                     f"only causal GPTs convert")
    if "n_head" not in params:
        raise TamingFormatError("needs transformer_config.params.n_head from its config: the weights do not say "
                                "how many attention heads split them")
    return {**found, "n_head": int(params["n_head"]), "dropout": float(params.get("resid_pdrop", 0.0))}


def convert_gpt(gpt: dict[str, torch.Tensor], *, codebook_size: int, condition_vocab: int, block_size: int,
                null_row: int | None) -> dict[str, torch.Tensor]:
    """Taming's GPT weights (prefix removed) in the names and token layout of :class:`transformer.gpt.GPT` (see the
    module docstring) for ``codebook_size`` image codes, ``condition_vocab`` condition tokens and sequences of
    ``block_size`` tokens. ``null_row`` is taming's row for the null token (its ``sos_token``), or None for the
    mean of the condition rows. A condition token beyond taming's table (the top coordinate id ``levels`` of a
    table of ``levels`` rows, which taming itself cannot embed) takes the last row."""
    try:
        return _convert_gpt(gpt, codebook_size, condition_vocab, block_size, null_row)
    except KeyError as err:
        raise TamingFormatError(f"has no tensor 'transformer.{err.args[0]}', which taming's GPT has") from err


def _convert_gpt(gpt: dict[str, torch.Tensor], codebook_size: int, condition_vocab: int, block_size: int,
                 null_row: int | None) -> dict[str, torch.Tensor]:
    emb = gpt["tok_emb.weight"]
    vocab = emb.shape[0]
    if vocab < codebook_size:
        raise TamingFormatError(f"has a GPT vocabulary of {vocab} tokens, fewer than the first stage's "
                                f"{codebook_size} codes")
    if gpt["pos_emb"].shape[1] < block_size:
        raise TamingFormatError(f"has a GPT of block_size {gpt['pos_emb'].shape[1]}, but its condition and image "
                                f"tokens need {block_size} positions")
    if null_row is not None and not 0 <= null_row < vocab:
        raise TamingFormatError(f"starts its sequences with sos_token {null_row}, outside its {vocab}-token "
                                f"vocabulary")
    cond_rows = emb[torch.arange(condition_vocab).clamp(max=vocab - 1)]
    null = emb[null_row] if null_row is not None else cond_rows.mean(0)
    out = {"tok_emb.weight": torch.cat([emb[:codebook_size], cond_rows, null[None]]),
           "pos_emb.weight": gpt["pos_emb"][0, :block_size], "head.weight": gpt["head.weight"][:codebook_size],
           "ln_f.weight": gpt["ln_f.weight"], "ln_f.bias": gpt["ln_f.bias"]}
    blocks = sorted({int(m.group(1)) for key in gpt if (m := re.match(r"blocks\.(\d+)\.", key))})
    for i in blocks:
        source = f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{source}attn.qkv.{kind}"] = torch.cat([gpt[f"{source}attn.{name}.{kind}"]
                                                         for name in ("query", "key", "value")])
            for theirs, ours in BLOCK_NAMES.items():
                out[f"{source}{ours}.{kind}"] = gpt[f"{source}{theirs}.{kind}"]
    return out

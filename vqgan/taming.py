"""Weights of taming-transformers' ``VQModel`` -> this package's VQGAN, Discriminator and LPIPS weights.

A pure function of a state dict (no files): :func:`convert_taming_state_dict` infers the architecture
from tensor names and shapes, renames every tensor, and checks the result key by key against the
modules it describes. The networks compute the same functions as taming's; only names differ:

* ``encoder.mid.block_1 / attn_1 / block_2`` -> ``encoder.mid.0 / 1 / 2`` (the same in the decoder);
* ``decoder.up.{level}``, stored finest level first -> ``decoder.up.{L-1-level}``, in the order they run;
* ``quantize.embedding.weight`` -> ``quantizer.codebook``; for a Gumbel-softmax VQGAN (``GumbelVQ``, such as
  vqgan_gumbel_f8) ``quantize.embed.weight`` -> ``quantizer.codebook`` and ``quantize.proj`` -> ``quantizer.proj``
  of a :class:`~vqgan.quantizer.GumbelQuantizer` (``GumbelVQ`` keeps ``VQModel``'s ``quant_conv`` [z_channels ->
  embed_dim] and ``post_quant_conv`` [embed_dim -> z_channels], and ``proj`` reads ``quant_conv``'s output, so
  taming's own code runs only when z_channels = embed_dim, as in vqgan_gumbel_f8; other shapes are refused);
* ``loss.discriminator.*`` -> the :class:`~vqgan.discriminator.Discriminator`, names unchanged;
* ``loss.perceptual_loss.net.sliceK.N.*`` -> ``features.N.*`` of a torchvision VGG16 state dict;
* ``loss.perceptual_loss.linI.*`` -> ``linI.*`` of an LPIPS ``vgg.pth`` heads file.

Taming's quantizer picks the nearest code by squared L2 distance, as ours does, so indices and
quantized latents agree at inference. Its training loss puts ``beta`` on the codebook term
instead of the commitment term ("legacy" mode); that matters only when training. Taming's Gumbel
quantizer samples its codes (Gumbel noise on the logits, even in eval mode); the imported one takes the
most likely code, and decodes given codes exactly as taming does. A segmentation tokenizer
(``VQSegmentationModel``: label maps one-hot in, label logits out) converts with ``labels=True``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torchvision.models import vgg16

from vqgan.discriminator import Discriminator, DiscriminatorConfig
from vqgan.lpips import TAP_CHANNELS, TAP_ENDS
from vqgan.model import VQGAN

# The commitment weight taming's VQModel hard-codes into its quantizer.
TAMING_BETA = 0.25
MODEL_PARTS = ("encoder.", "decoder.", "quantize.", "quant_conv.", "post_quant_conv.")
DISC_PREFIX = "loss.discriminator."
LPIPS_PREFIX = "loss.perceptual_loss."
# taming's LPIPS ScalingLayer buffers: fixed constants that our LPIPS builds in.
LPIPS_CONSTANTS = ("scaling_layer.shift", "scaling_layer.scale")
MID_NAMES = {"block_1": "0", "attn_1": "1", "block_2": "2"}


class TamingFormatError(ValueError):
    """A state dict that is not the weights of a taming-transformers VQGAN this package can rebuild."""


class UnsupportedTamingModel(TamingFormatError):
    """Weights of a taming model variant with no counterpart here (remapped codes, double_z, ...)."""


@dataclass
class TamingConversion:
    """Result of :func:`convert_taming_state_dict`.

    ``model_args`` rebuild the autoencoder as ``VQGAN.from_model_config(model_args)``, which loads
    ``model_state`` strictly; likewise a Discriminator of ``disc_args`` and ``disc_state`` (None when the file has no
    discriminator). ``lpips_vgg`` is a torchvision VGG16 state dict (``features.*``) and
    ``lpips_heads`` an LPIPS ``vgg.pth`` state dict, each None when absent. ``ignored`` lists the
    names that were not used.
    """

    model_args: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    disc_args: dict[str, Any] | None = None
    disc_state: dict[str, torch.Tensor] | None = None
    lpips_vgg: dict[str, torch.Tensor] | None = None
    lpips_heads: dict[str, torch.Tensor] | None = None
    ignored: list[str] = field(default_factory=list)


def _indices(state: dict[str, torch.Tensor], pattern: str) -> list[int]:
    """Sorted distinct integers captured by ``pattern`` (one group) over all keys."""
    found = {int(m.group(1)) for key in state if (m := re.match(pattern, key))}
    return sorted(found)


def _shape(state: dict[str, torch.Tensor], key: str) -> torch.Size:
    if key not in state:
        raise TamingFormatError(f"has no tensor '{key}', which every taming VQGAN has")
    return state[key].shape


GUMBEL_NAMES = ("quantize.embed.weight", "quantize.proj.weight", "quantize.proj.bias")


def _check_quantizer(state: dict[str, torch.Tensor]) -> str:
    """The kind of quantizer the tensors hold: ``nearest`` (VQModel) or ``gumbel`` (GumbelVQ)."""
    names = sorted(key for key in state if key.startswith("quantize."))
    kind = "gumbel" if "quantize.embed.weight" in state else "nearest"
    expected = GUMBEL_NAMES if kind == "gumbel" else ("quantize.embedding.weight",)
    if kind == "nearest" and "quantize.embedding.weight" not in state:
        raise TamingFormatError("has no codebook 'quantize.embedding.weight' (nor a Gumbel codebook "
                                "'quantize.embed.weight'), so it is not the weights of a taming VQGAN (VQModel)")
    missing = [name for name in expected if name not in state]
    if missing:
        raise TamingFormatError(f"has a Gumbel codebook but not {', '.join(missing)}")
    extra = [name for name in names if name not in expected]
    if extra:
        raise UnsupportedTamingModel(
            f"has quantizer tensors this repository has no counterpart for ({', '.join(extra)}); 'quantize.used' "
            f"means a remapped codebook (remap=...). Only the plain quantizers (quantize.embedding.weight, or "
            f"quantize.embed and quantize.proj of a Gumbel VQGAN) can be imported")
    return kind


def infer_architecture(state: dict[str, torch.Tensor], resolution: int = 256, labels: bool = False) -> dict[str, Any]:
    """VQGAN keyword arguments (``in_channels`` ... ``quantizer``) read off a taming state dict's names and shapes.

    ``resolution`` only places ``attn_resolutions``: attention is stored per level, and level ``i``
    works at ``resolution / 2**i``. ``labels``: the weights tokenize segmentation maps (``VQSegmentationModel``),
    with one input and output channel per label.
    """
    quantizer = _check_quantizer(state)
    conv_in = _shape(state, "encoder.conv_in.weight")
    ch, in_channels = conv_in[0], conv_in[1]
    levels = _indices(state, r"encoder\.down\.(\d+)\.")
    if not levels or levels != list(range(len(levels))):
        raise TamingFormatError("has no encoder levels encoder.down.0, encoder.down.1, ...")
    num_res_blocks = len(_indices(state, r"encoder\.down\.0\.block\.(\d+)\."))
    ch_mult = []
    for level in levels:
        width = _shape(state, f"encoder.down.{level}.block.0.conv1.weight")[0]
        if width % ch:
            raise TamingFormatError(f"has encoder level {level} with {width} channels, not a multiple of ch={ch}")
        ch_mult.append(width // ch)
        blocks = len(_indices(state, rf"encoder\.down\.{level}\.block\.(\d+)\."))
        if blocks != num_res_blocks:
            raise TamingFormatError(f"has {blocks} ResNet blocks at encoder level {level} but {num_res_blocks} at "
                                    f"level 0; taming uses the same number at every level")
    decoder_levels = _indices(state, r"decoder\.up\.(\d+)\.")
    if decoder_levels != levels:
        raise TamingFormatError(f"has {len(decoder_levels)} decoder levels but {len(levels)} encoder levels")
    attn_levels = _indices(state, r"encoder\.down\.(\d+)\.attn\.")
    decoder_attn = _indices(state, r"decoder\.up\.(\d+)\.attn\.")
    if attn_levels != decoder_attn:
        raise TamingFormatError(f"has attention at encoder levels {attn_levels} but decoder levels {decoder_attn}")
    z_out = _shape(state, "encoder.conv_out.weight")[0]
    quant_in = _shape(state, "quant_conv.weight")
    if z_out != quant_in[1]:
        raise UnsupportedTamingModel(
            f"has an encoder with {z_out} output channels feeding quant_conv with {quant_in[1]} inputs "
            f"(double_z=true?); only VQGANs with double_z=false can be imported")
    codebook = _shape(state, "quantize.embed.weight" if quantizer == "gumbel" else "quantize.embedding.weight")
    if quantizer == "gumbel":
        proj = _shape(state, "quantize.proj.weight")
        if tuple(proj) != (codebook[0], quant_in[0], 1, 1):
            raise TamingFormatError(
                f"has a Gumbel projection quantize.proj of shape {tuple(proj)}, but quant_conv gives {quant_in[0]} "
                f"channels and the codebook has {codebook[0]} codes: taming's GumbelVQ feeds quant_conv's output to "
                f"it, so it needs ({codebook[0]}, {quant_in[0]}, 1, 1) (z_channels = embed_dim)")
    out_channels = _shape(state, "decoder.conv_out.weight")[0]
    if labels and out_channels != in_channels:
        raise TamingFormatError(f"is a segmentation tokenizer with {in_channels} input but {out_channels} output "
                                f"channels; it needs one of each per label")
    if not labels and (out_channels != in_channels or in_channels not in (1, 3)):
        raise UnsupportedTamingModel(
            f"maps {in_channels}-channel inputs to {out_channels}-channel outputs; only image models with 1 or 3 "
            f"channels in and out can be imported (a segmentation tokenizer, VQSegmentationModel, converts as the "
            f"condition stage of a stage-2 checkpoint)")
    return dict(
        in_channels=int(in_channels), resolution=int(resolution), ch=int(ch), ch_mult=tuple(ch_mult),
        num_res_blocks=num_res_blocks, attn_resolutions=tuple(resolution // 2**level for level in attn_levels),
        z_channels=int(z_out), dropout=0.0, codebook_size=int(codebook[0]), embed_dim=int(codebook[1]),
        beta=TAMING_BETA, quantizer=quantizer, num_labels=int(in_channels) if labels else 0,
    )


def check_against_config(model_args: dict[str, Any], model_config: dict[str, Any]) -> None:
    """Compare inferred arguments with a taming config's ``model`` section; raise on any disagreement.

    ``model_config`` is the ``model`` mapping of a taming YAML (``target`` and ``params`` with
    ``ddconfig``, ``n_embed``, ``embed_dim``). Attention is compared by level, so the check holds
    whatever resolution the weights are imported at.
    """
    target = str(model_config.get("target", ""))
    params = model_config.get("params") or {}
    described = "gumbel" if target.endswith("GumbelVQ") else "nearest"
    if target and described != model_args["quantizer"]:
        holds = "a Gumbel quantizer" if model_args["quantizer"] == "gumbel" else "a nearest-code quantizer"
        raise TamingFormatError(f"is described by its config as {target}, but its tensors hold {holds}")
    dd = params.get("ddconfig") or {}
    if not isinstance(dd, dict) or not dd:
        raise TamingFormatError("config has no model.params.ddconfig section")
    if dd.get("double_z", False):
        raise UnsupportedTamingModel("config sets ddconfig.double_z=true; only double_z=false VQGANs can be imported")
    config_resolution = int(dd.get("resolution", model_args["resolution"]))
    config_attn = sorted(int(r) for r in dd.get("attn_resolutions", []))
    levels = [(model_args["resolution"] // r).bit_length() - 1 for r in model_args["attn_resolutions"]]
    expected = {
        "ddconfig.ch": (dd.get("ch"), model_args["ch"]),
        "ddconfig.ch_mult": (None if dd.get("ch_mult") is None else tuple(dd["ch_mult"]), model_args["ch_mult"]),
        "ddconfig.num_res_blocks": (dd.get("num_res_blocks"), model_args["num_res_blocks"]),
        "ddconfig.z_channels": (dd.get("z_channels"), model_args["z_channels"]),
        "ddconfig.in_channels": (dd.get("in_channels"), model_args["in_channels"]),
        "ddconfig.out_ch": (dd.get("out_ch"), model_args["in_channels"]),
        "ddconfig.attn_resolutions": (config_attn, sorted(config_resolution // 2**level for level in levels)),
        "n_embed": (params.get("n_embed"), model_args["codebook_size"]),
        "n_labels": (params.get("n_labels"), model_args["num_labels"] or None),
        "embed_dim": (params.get("embed_dim"), model_args["embed_dim"]),
    }
    wrong = [f"{key}: config {given!r}, tensors {found!r}" for key, (given, found) in expected.items()
             if given is not None and given != found]
    if wrong:
        raise TamingFormatError("does not match the config: " + "; ".join(wrong))


def _model_key(key: str, levels: int) -> str:
    """This repository's name for one taming VQModel tensor (encoder, decoder, quantizer, 1x1 convs)."""
    if key in ("quantize.embedding.weight", "quantize.embed.weight"):
        return "quantizer.codebook"
    if key.startswith("quantize.proj."):
        return "quantizer." + key.removeprefix("quantize.")
    parts = key.split(".")
    if parts[0] in ("encoder", "decoder") and parts[1] == "mid" and parts[2] in MID_NAMES:
        parts[2] = MID_NAMES[parts[2]]
    elif parts[0] == "decoder" and parts[1] == "up":
        parts[2] = str(levels - 1 - int(parts[2]))
    return ".".join(parts)


def _lpips_parts(tensors: dict[str, torch.Tensor]) -> tuple[dict | None, dict | None, list[str]]:
    """Split ``loss.perceptual_loss.*`` (prefix removed) into a VGG16 features dict and an LPIPS heads dict."""
    vgg, heads, ignored = {}, {}, []
    for key, value in tensors.items():
        if m := re.fullmatch(r"net\.slice\d\.(\d+)\.(weight|bias)", key):
            vgg[f"features.{m.group(1)}.{m.group(2)}"] = value
        elif re.fullmatch(r"lin\d\.model\.1\.weight", key):
            heads[key] = value
        elif key not in LPIPS_CONSTANTS:
            ignored.append(LPIPS_PREFIX + key)
    if vgg:
        with torch.device("meta"):
            features = vgg16(weights=None).features[:TAP_ENDS[-1]]
        expected = {f"features.{key}": value.shape for key, value in features.state_dict().items()}
        if {key: value.shape for key, value in vgg.items()} != expected:
            raise TamingFormatError("has an incomplete or mis-shaped LPIPS VGG16 (loss.perceptual_loss.net.*)")
    if heads and set(heads) != {f"lin{i}.model.1.weight" for i in range(len(TAP_CHANNELS))}:
        raise TamingFormatError(f"has an incomplete set of LPIPS heads ({', '.join(sorted(heads))})")
    return vgg or None, heads or None, ignored


def _fit(module: torch.nn.Module, mapped: dict[str, torch.Tensor], what: str,
         fresh_ok: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """``module``'s full state dict with ``mapped`` in it; names in ``fresh_ok`` may keep the module's values."""
    own = module.state_dict()
    missing = sorted(set(own) - set(mapped) - fresh_ok)
    unexpected = sorted(set(mapped) - set(own))
    wrong = [f"{k} {tuple(mapped[k].shape)} (expected {tuple(own[k].shape)})" for k in sorted(set(own) & set(mapped))
             if own[k].shape != mapped[k].shape]
    if missing or unexpected or wrong:
        problems = [f"{title}: {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}"
                    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
                    if items]
        raise TamingFormatError(f"has {what} tensors that do not fit the architecture their names describe ("
                                + "; ".join(problems) + ")")
    return {key: mapped[key].detach().to(value.dtype).clone() if key in mapped else value
            for key, value in own.items()}


def _disc_args(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    if any(key.endswith((".loc", ".initialized")) for key in tensors):
        raise UnsupportedTamingModel("has a discriminator with ActNorm layers (use_actnorm=true); only the "
                                     "BatchNorm PatchGAN can be imported")
    convs = _indices(tensors, r"main\.(\d+)\.weight")
    first = tensors["main.0.weight"]
    norms = [i for i in convs if tensors[f"main.{i}.weight"].dim() == 1]
    n_layers = len(convs) - len(norms) - 2
    return dict(in_channels=int(first.shape[1]), ndf=int(first.shape[0]), n_layers=n_layers,
                norm="batch" if norms else "none")


def convert_taming_state_dict(state: dict[str, torch.Tensor], resolution: int = 256,
                              model_config: dict[str, Any] | None = None, labels: bool = False) -> TamingConversion:
    """Rename a taming ``VQModel`` (or ``GumbelVQ``; with ``labels``, ``VQSegmentationModel``) state dict (as in
    its Lightning checkpoint) to this package's modules.

    Raises :class:`TamingFormatError` (:class:`UnsupportedTamingModel` for variants with no
    counterpart here) when the tensors are not a taming VQGAN or contradict ``model_config``.
    """
    state = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    model_args = infer_architecture(state, resolution, labels)
    if model_config is not None:
        check_against_config(model_args, model_config)
        dropout = ((model_config.get("params") or {}).get("ddconfig") or {}).get("dropout")
        if dropout is not None:
            model_args["dropout"] = float(dropout)
    levels = len(model_args["ch_mult"])
    model_part, disc_part, lpips_part, ignored = {}, {}, {}, []
    for key, value in state.items():
        if key.startswith(MODEL_PARTS):
            model_part[_model_key(key, levels)] = value
        elif key.startswith(DISC_PREFIX):
            disc_part[key.removeprefix(DISC_PREFIX)] = value
        elif key.startswith(LPIPS_PREFIX):
            lpips_part[key.removeprefix(LPIPS_PREFIX)] = value
        else:
            ignored.append(key)
    try:
        model = VQGAN.from_model_config(model_args)
    except ValueError as err:
        raise TamingFormatError(f"describes an architecture that cannot be built at resolution {resolution}: "
                                f"{err}") from err
    statistics = frozenset(name for name, _ in model.named_buffers() if name.startswith("quantizer."))
    result = TamingConversion(model_args=model.model_config,
                              model_state=_fit(model, model_part, "autoencoder", statistics))
    if disc_part:
        if "main.0.weight" not in disc_part:
            raise TamingFormatError("has discriminator tensors but no first layer loss.discriminator.main.0.weight")
        result.disc_args = _disc_args(disc_part)
        disc_options = {key: value for key, value in result.disc_args.items() if key != "in_channels"}
        disc = Discriminator(result.disc_args["in_channels"], DiscriminatorConfig(**disc_options))
        result.disc_state = _fit(disc, disc_part, "discriminator")
    result.lpips_vgg, result.lpips_heads, lpips_ignored = _lpips_parts(lpips_part)
    result.ignored = sorted(ignored + lpips_ignored)
    return result

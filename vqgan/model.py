"""VQGAN autoencoder: encoder -> quant_conv -> vector quantiser -> post_quant_conv -> decoder."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from utils.checkpoint import CheckpointError, load_state_dict_checked
from utils.config import option
from vqgan.decoder import Decoder
from vqgan.encoder import Encoder
from vqgan.quantizer import GumbelQuantizer, QuantizerConfig, QuantizerOutput, VectorQuantizer


@dataclass
class VQGANConfig(QuantizerConfig):
    """The ``model`` config section: the codebook options of :class:`QuantizerConfig` plus the
    encoder/decoder architecture (image size and channels come from the data)."""

    ch: int = option(64, "base channel count of encoder and decoder")
    ch_mult: tuple[int, ...] = option((1, 2, 2), "channel multiplier per level; downsample factor = 2**(len-1)")
    num_res_blocks: int = option(1, "ResNet blocks per encoder level (decoder uses one more)")
    attn_resolutions: tuple[int, ...] = option((8,), "feature-map sizes that get self-attention")
    z_channels: int = option(64, "channels of the encoder output / decoder input")
    dropout: float = option(0.0, "dropout inside ResNet blocks")


class VQGANOutput(NamedTuple):
    """Result of :meth:`VQGAN.forward`: images, codebook loss and code indices [B, h, w]."""

    reconstruction: torch.Tensor
    codebook_loss: torch.Tensor
    indices: torch.Tensor


class VQGAN(nn.Module):
    """Stage-1 model. Images in, reconstructions and discrete codes out.

    ``config`` is the ``model`` config section; ``in_channels`` and ``resolution`` come from the
    data. :attr:`model_config` holds all of them as plain values, and :meth:`from_model_config`
    rebuilds the model from it (checkpoints store it). Stage 2 relies only on
    :meth:`encode_to_indices`, :meth:`decode_indices`, :attr:`latent_size` and :attr:`codebook_size`.

    ``config.quantizer`` picks the quantizer: ``nearest`` (:class:`~vqgan.quantizer.VectorQuantizer`, trained
    here) or ``gumbel`` (:class:`~vqgan.quantizer.GumbelQuantizer`, for taming's Gumbel VQGANs, imported only).

    With ``num_labels`` > 0 the model tokenizes segmentation maps (taming's ``VQSegmentationModel``): its
    inputs are label maps [B, 1, H, W] of ids ``0 .. num_labels - 1``, which the encoder sees one-hot
    (``in_channels`` must equal ``num_labels``), and its outputs are per-pixel label logits
    [B, num_labels, H, W], trained with a cross-entropy reconstruction loss.
    """

    def __init__(self, config: VQGANConfig, *, in_channels: int, resolution: int, num_labels: int = 0) -> None:
        super().__init__()
        if num_labels and in_channels != num_labels:
            raise ValueError(f"a segmentation tokenizer sees its {num_labels} labels one-hot, so it needs "
                             f"in_channels={num_labels}, got {in_channels}.")
        config = dataclasses.replace(config, ch_mult=tuple(config.ch_mult),
                                     attn_resolutions=tuple(config.attn_resolutions))
        self.options = config
        self.in_channels = in_channels
        self.resolution = resolution
        self.num_labels = num_labels
        shape = dict(ch=config.ch, ch_mult=config.ch_mult, num_res_blocks=config.num_res_blocks,
                     attn_resolutions=config.attn_resolutions, z_channels=config.z_channels, resolution=resolution,
                     dropout=config.dropout)
        self.encoder = Encoder(**shape, in_channels=in_channels)
        self.decoder = Decoder(**shape, out_channels=in_channels)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, kernel_size=1)
        self.quantizer = GumbelQuantizer(config) if config.quantizer == "gumbel" else VectorQuantizer(config)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, kernel_size=1)

    @property
    def model_config(self) -> dict[str, Any]:
        """Every constructor argument as plain values: what checkpoints store as ``model_config``."""
        return {"in_channels": self.in_channels, "resolution": self.resolution, "num_labels": self.num_labels,
                **dataclasses.asdict(self.options)}

    @classmethod
    def from_model_config(cls, model_config: dict[str, Any]) -> VQGAN:
        """The model :attr:`model_config` describes (weights freshly initialised)."""
        options = dict(model_config)
        in_channels, resolution = options.pop("in_channels"), options.pop("resolution")
        num_labels = options.pop("num_labels", 0)  # absent from checkpoints of image tokenizers written before
        return cls(VQGANConfig(**options), in_channels=in_channels, resolution=resolution, num_labels=num_labels)

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any], source: str) -> VQGAN:
        """The trained model of a stage-1 checkpoint dict, in eval mode (EMA weights when the run kept them).

        ``source`` names the checkpoint in error messages.
        """
        saved = state.get("model_config")
        known = {f.name for f in dataclasses.fields(VQGANConfig)} | {"in_channels", "resolution", "num_labels"}
        unknown = sorted(set(saved) - known) if isinstance(saved, dict) else []
        if unknown:
            raise CheckpointError(f"{source}: its model_config has the key(s) {', '.join(map(repr, unknown))}, which "
                                  f"this version of the code does not know, so the model cannot be built. Use the "
                                  f"version of the code that wrote the checkpoint.")
        try:
            model = cls.from_model_config(saved)
        except (TypeError, KeyError, ValueError, AttributeError) as err:
            raise CheckpointError(f"{source}: its model_config cannot be built by this version of the code "
                                  f"({err}). Was it written by another version or another program?") from err
        load_state_dict_checked(model, state.get("ema") or state["model"], source)
        return model.eval()

    @property
    def downsample_factor(self) -> int:
        return self.encoder.downsample_factor

    @property
    def latent_size(self) -> tuple[int, int]:
        """Token grid (h, w) for images of ``resolution`` x ``resolution``."""
        side = self.resolution // self.downsample_factor
        return side, side

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    @property
    def last_layer_weight(self) -> torch.Tensor:
        """Weight of the decoder's final convolution (where the adaptive GAN weight is measured)."""
        return self.decoder.last_layer_weight

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the encoder sees: the images themselves, or label maps [B, 1, H, W] one-hot [B, num_labels, H, W]."""
        if not self.num_labels:
            return x
        one_hot = F.one_hot(x[:, 0].long(), self.num_labels).permute(0, 3, 1, 2)
        return one_hot.to(self.quant_conv.weight.dtype, memory_format=torch.contiguous_format)

    def encode(self, x: torch.Tensor) -> QuantizerOutput:
        """Images [B, C, H, W] in [-1, 1] (or label maps) -> quantizer output (z_q [B, embed_dim, h, w], loss,
        indices)."""
        return self.quantizer(self.quant_conv(self.encoder(self.encoder_input(x))))

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantized latents [B, embed_dim, h, w] -> images [B, C, H, W]."""
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, x: torch.Tensor) -> VQGANOutput:
        """Encode, quantize and decode: reconstruction, codebook loss and indices."""
        quantized = self.encode(x)
        return VQGANOutput(self.decode(quantized.z_q), quantized.loss, quantized.indices)

    @torch.no_grad()
    def encode_to_indices(self, images: torch.Tensor) -> torch.Tensor:
        """Code indices LongTensor [B, h, w]; leaves codebook statistics untouched."""
        return self.quantizer.nearest_indices(self.quant_conv(self.encoder(self.encoder_input(images))))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Images for code indices [B, h, w]."""
        return self.decode(self.quantizer.embed_indices(indices))

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices [B, h, w], reconstructions clamped to [-1, 1]; label maps [B, 1, H, W] for a segmentation
        tokenizer): exactly what decoding exported tokens gives."""
        indices = self.encode_to_indices(images)
        return indices, self.outputs(self.decode_indices(indices))

    def outputs(self, decoded: torch.Tensor) -> torch.Tensor:
        """Decoder outputs as what the model reconstructs: images clamped to [-1, 1], or the most likely label of
        every pixel [B, 1, H, W] (long) for a segmentation tokenizer."""
        return decoded.argmax(1, keepdim=True) if self.num_labels else decoded.clamp(-1, 1)

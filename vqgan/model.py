"""VQGAN autoencoder: encoder -> quant_conv -> vector quantiser -> post_quant_conv -> decoder."""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
from torch import nn

from vqgan.decoder import Decoder
from vqgan.encoder import Encoder
from vqgan.quantizer import QuantizerOutput, VectorQuantizer


class VQGANOutput(NamedTuple):
    """Result of :meth:`VQGAN.forward`: images, codebook loss, code indices [B, h, w], batch perplexity."""

    reconstruction: torch.Tensor
    codebook_loss: torch.Tensor
    indices: torch.Tensor
    perplexity: torch.Tensor


class VQGAN(nn.Module):
    """Stage-1 model. Images in, reconstructions and discrete codes out.

    Keyword names match the ``model`` config section; ``in_channels`` and ``resolution`` come from
    the data. ``self.config`` holds every constructor argument so ``VQGAN(**config)`` rebuilds it.
    Stage 2 relies only on :meth:`encode_to_indices`, :meth:`decode_indices`, :attr:`latent_size`
    and :attr:`codebook_size`.
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        resolution: int = 32,
        ch: int = 64,
        ch_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 1,
        attn_resolutions: Sequence[int] = (8,),
        z_channels: int = 64,
        dropout: float = 0.0,
        codebook_size: int = 512,
        embed_dim: int = 64,
        codebook_dim: int | None = None,
        l2_norm: bool = False,
        beta: float = 0.25,
        ema: bool = False,
        ema_decay: float = 0.99,
        ema_eps: float = 1e-5,
        dead_code_steps: int = 0,
        usage_window: int = 100,
    ) -> None:
        super().__init__()
        ch_mult, attn_resolutions = tuple(ch_mult), tuple(attn_resolutions)
        self.config: dict[str, Any] = dict(
            in_channels=in_channels, resolution=resolution, ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
            attn_resolutions=attn_resolutions, z_channels=z_channels, dropout=dropout, codebook_size=codebook_size,
            embed_dim=embed_dim, codebook_dim=codebook_dim, l2_norm=l2_norm, beta=beta, ema=ema,
            ema_decay=ema_decay, ema_eps=ema_eps, dead_code_steps=dead_code_steps, usage_window=usage_window,
        )
        self.resolution = resolution
        shape = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions,
                     z_channels=z_channels, resolution=resolution, dropout=dropout)
        self.encoder = Encoder(**shape, in_channels=in_channels)
        self.decoder = Decoder(**shape, out_channels=in_channels)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, kernel_size=1)
        self.quantizer = VectorQuantizer(
            codebook_size, embed_dim, codebook_dim=codebook_dim, l2_norm=l2_norm, beta=beta, ema=ema,
            ema_decay=ema_decay, ema_eps=ema_eps, dead_code_steps=dead_code_steps, usage_window=usage_window,
        )
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)

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
    def last_layer(self) -> torch.Tensor:
        """Weight of the decoder's final convolution (where the adaptive GAN weight is measured)."""
        return self.decoder.conv_out.weight

    def encode(self, x: torch.Tensor) -> QuantizerOutput:
        """Images [B, C, H, W] in [-1, 1] -> quantizer output (z_q [B, embed_dim, h, w], loss, indices)."""
        return self.quantizer(self.quant_conv(self.encoder(x)))

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Quantized latents [B, embed_dim, h, w] -> images [B, C, H, W]."""
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, x: torch.Tensor) -> VQGANOutput:
        """Encode, quantize and decode: reconstruction, codebook loss, indices and batch perplexity."""
        quantized = self.encode(x)
        return VQGANOutput(self.decode(quantized.z_q), quantized.loss, quantized.indices, quantized.perplexity)

    @torch.no_grad()
    def encode_to_indices(self, images: torch.Tensor) -> torch.Tensor:
        """Code indices LongTensor [B, h, w]; leaves codebook statistics untouched."""
        return self.quantizer.nearest_indices(self.quant_conv(self.encoder(images)))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Images for code indices [B, h, w]."""
        return self.decode(self.quantizer.embed_indices(indices))

"""Stage 1: the VQGAN autoencoder, its vector quantiser, the PatchGAN discriminator, LPIPS and the losses."""

from vqgan.decoder import Decoder
from vqgan.discriminator import Discriminator, DiscriminatorConfig
from vqgan.encoder import Encoder
from vqgan.loss import (
    LossConfig,
    VQGANLoss,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
    lecam_regularizer,
    reconstruction_loss,
    vanilla_d_loss,
    vanilla_g_loss,
)
from vqgan.lpips import LPIPS, LPIPSWeightsError, LPIPSWeightsMismatchError
from vqgan.model import VQGAN, VQGANConfig, VQGANOutput
from vqgan.quantizer import QuantizerConfig, QuantizerOutput, VectorQuantizer, usage_and_perplexity

__all__ = [
    "Decoder",
    "Discriminator",
    "DiscriminatorConfig",
    "LossConfig",
    "QuantizerConfig",
    "VQGANConfig",
    "Encoder",
    "QuantizerOutput",
    "VQGAN",
    "VQGANOutput",
    "VectorQuantizer",
    "usage_and_perplexity",
    "LPIPS",
    "LPIPSWeightsError",
    "LPIPSWeightsMismatchError",
    "VQGANLoss",
    "adaptive_weight",
    "hinge_d_loss",
    "hinge_g_loss",
    "lecam_regularizer",
    "reconstruction_loss",
    "vanilla_d_loss",
    "vanilla_g_loss",
]

"""Stage-1 training objective: reconstruction, perceptual, codebook and adversarial terms.

:class:`VQGANLoss` runs the autoencoder's backward pass itself (:meth:`VQGANLoss.generator_backward`)
so that the adaptive GAN weight costs no extra backward passes through LPIPS or the discriminator,
and gives the discriminator's loss on detached reconstructions (:meth:`VQGANLoss.discriminator_loss`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from utils.config import option
from vqgan.lpips import LPIPS

ADAPTIVE_EPS = 1e-4


REC_LOSSES = ("l1", "l2", "cross_entropy")


def reconstruction_loss(inputs: torch.Tensor, reconstruction: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Mean absolute (``l1``) or squared (``l2``) pixel error, or for a segmentation tokenizer
    (``cross_entropy``) the mean cross-entropy of the label logits [B, L, H, W] against the label maps
    ``inputs`` [B, 1, H, W]; computed in fp32."""
    if kind == "cross_entropy":
        return F.cross_entropy(reconstruction.float(), inputs[:, 0].long())
    diff = inputs.float() - reconstruction.float()
    return diff.abs().mean() if kind == "l1" else diff.square().mean()


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN loss: 0.5 * (mean(softplus(-real)) + mean(softplus(fake)))."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge loss: -mean(fake)."""
    return -logits_fake.mean()


def vanilla_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the non-saturating loss: mean(softplus(-fake))."""
    return F.softplus(-logits_fake).mean()


def lecam_regularizer(
    logits_real: torch.Tensor, logits_fake: torch.Tensor, anchor_real: torch.Tensor, anchor_fake: torch.Tensor
) -> torch.Tensor:
    """LeCam regulariser (Tseng et al., 2021): mean(relu(real - anchor_fake)^2) + mean(relu(anchor_real - fake)^2).

    The anchors are moving averages of the mean real and fake logits.
    """
    return F.relu(logits_real - anchor_fake).square().mean() + F.relu(anchor_real - logits_fake).square().mean()


def adaptive_weight(rec_grad_norm: torch.Tensor, gan_grad_norm: torch.Tensor, max_weight: float) -> torch.Tensor:
    """||grad rec|| / (||grad gan|| + 1e-4), clamped to [0, max_weight] and detached."""
    return (rec_grad_norm / (gan_grad_norm + ADAPTIVE_EPS)).clamp(0.0, max_weight).detach()


GAN_LOSSES: dict[str, tuple[Callable[..., torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]] = {
    "hinge": (hinge_d_loss, hinge_g_loss),
    "vanilla": (vanilla_d_loss, vanilla_g_loss),
}


@contextmanager
def _no_param_grads(module: nn.Module) -> Iterator[None]:
    """Record the module's forward without its parameters, so no backward accumulates into them."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@dataclass
class LossConfig:
    """The ``loss`` config section."""

    rec_loss: Literal["l1", "l2", "cross_entropy"] = option(
        "l1", "reconstruction loss: l1 or l2 on pixels, cross_entropy on the labels of a segmentation tokenizer")
    rec_weight: float = option(1.0, "weight of the pixel reconstruction loss")
    perceptual_weight: float = option(1.0, "weight of the LPIPS loss (0 = off; needs VGG16 + LPIPS weights)")
    codebook_weight: float = option(1.0, "weight of the codebook + commitment loss")
    disc_start: int = option(10000, "step at which the GAN loss starts")
    disc_weight: float = option(0.8, "weight of the generator (GAN) loss")
    disc_loss: Literal["hinge", "vanilla"] = option("hinge", "discriminator / generator loss form")
    adaptive_weight: bool = option(True,
                                   "scale the GAN loss by ||grad rec|| / ||grad gan|| at the decoder's last layer")
    adaptive_weight_max: float = option(1e4, "clamp of the adaptive weight")
    disc_warmup_steps: int = option(0, "ramp the GAN weight linearly from 0 over this many steps after disc_start")
    lecam_weight: float = option(0.0, "LeCam regularisation of the discriminator (0 = off)")
    lecam_decay: float = option(0.999, "EMA decay of the LeCam anchors")
    lpips_vgg_path: Optional[str] = option(None, "VGG16 ImageNet weights file (default: torchvision cache)")
    lpips_heads_path: Optional[str] = option(None,
                                             "LPIPS linear-head weights vgg.pth (default: from the lpips package)")


class LeCamAnchors(nn.Module):
    """Moving averages of the discriminator's mean real and fake logits (the LeCam anchors).

    They are persistent buffers, so a checkpoint of this module's ``state_dict`` resumes them.
    """

    def __init__(self, decay: float) -> None:
        super().__init__()
        self.decay = decay
        self.register_buffer("real", torch.zeros(()))
        self.register_buffer("fake", torch.zeros(()))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def update(self, mean_real: torch.Tensor, mean_fake: torch.Tensor) -> None:
        """Move the anchors towards this batch's mean logits (the first batch sets them)."""
        for anchor, value in ((self.real, mean_real), (self.fake, mean_fake)):
            anchor.copy_(torch.where(self.ready, self.decay * anchor + (1.0 - self.decay) * value, value))
        self.ready.fill_(True)


class VQGANLoss(nn.Module):
    """The VQGAN objective; keyword arguments mirror the ``loss`` config section.

    Autoencoder loss = ``rec_weight`` * rec + ``perceptual_weight`` * LPIPS + ``codebook_weight`` * codebook
    + w * ``gan_factor(step)`` * generator loss, where w is the adaptive weight
    ||grad (rec + perceptual)|| / (||grad gan|| + 1e-4) at the decoder's last layer (clamped to
    ``adaptive_weight_max``) or 1 when ``adaptive_weight`` is off. With ``perceptual_weight`` 0 no
    LPIPS is built, so no weight files are needed.
    """

    def __init__(self, config: LossConfig) -> None:
        super().__init__()
        if config.rec_loss not in REC_LOSSES:
            raise ValueError(f"rec_loss must be one of {', '.join(REC_LOSSES)}, got {config.rec_loss!r}.")
        if config.disc_loss not in GAN_LOSSES:
            raise ValueError(f"disc_loss must be one of {', '.join(GAN_LOSSES)}, got {config.disc_loss!r}.")
        self.rec_loss = config.rec_loss
        self.rec_weight = config.rec_weight
        self.perceptual_weight = config.perceptual_weight
        self.codebook_weight = config.codebook_weight
        self.disc_start = config.disc_start
        self.disc_weight = config.disc_weight
        self.d_loss_fn, self.g_loss_fn = GAN_LOSSES[config.disc_loss]
        self.use_adaptive_weight = config.adaptive_weight
        self.adaptive_weight_max = config.adaptive_weight_max
        self.disc_warmup_steps = config.disc_warmup_steps
        self.lecam_weight = config.lecam_weight
        self.lecam = LeCamAnchors(config.lecam_decay)
        self.lpips = LPIPS(config.lpips_vgg_path, config.lpips_heads_path) if config.perceptual_weight > 0 else None

    def gan_factor(self, step: int) -> float:
        """0 before ``disc_start``; then ``disc_weight``, ramped linearly over ``disc_warmup_steps``.

        With warm-up, step ``disc_start + k`` gets ``disc_weight * min(1, (k + 1) / disc_warmup_steps)``.
        """
        if step < self.disc_start:
            return 0.0
        if self.disc_warmup_steps <= 0:
            return float(self.disc_weight)
        return float(self.disc_weight) * min(1.0, (step - self.disc_start + 1) / self.disc_warmup_steps)

    def _nll(
        self, inputs: torch.Tensor, reconstruction: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rec_weight * rec + perceptual_weight * LPIPS, rec, LPIPS)."""
        rec = reconstruction_loss(inputs, reconstruction, self.rec_loss)
        if self.lpips is None:
            perceptual = rec.new_zeros(())
        else:
            perceptual = self.lpips(inputs, reconstruction).float().mean()
        return self.rec_weight * rec + self.perceptual_weight * perceptual, rec, perceptual

    def _adaptive(self, rec_grad: torch.Tensor, gan_grad: torch.Tensor) -> torch.Tensor:
        return adaptive_weight(rec_grad.norm(), gan_grad.norm(), self.adaptive_weight_max)

    def generator_backward(
        self,
        inputs: torch.Tensor,
        reconstruction: torch.Tensor,
        codebook_loss: torch.Tensor,
        discriminator: nn.Module,
        last_layer: torch.Tensor,
        step: int,
        scale: float = 1.0,
    ) -> dict[str, torch.Tensor]:
        """Backpropagate ``scale`` * autoencoder loss into the autoencoder; return the terms.

        The terms, ``gan_factor`` included, are float64 0-d tensors on the device (read them with
        ``float()`` when they are logged, not every step: on CUDA a read waits for the GPU).

        ``last_layer`` is the weight of the decoder's final convolution. The discriminator runs only
        when ``gan_factor(step) > 0`` and its parameters receive no gradients (pass the bare module,
        not a DDP wrapper).

        The gradients of the reconstruction(+perceptual) loss and of the GAN loss with respect to
        ``reconstruction`` are taken once each; the last-layer gradient norms of the adaptive weight
        are derived from them, and the combined gradient goes through the decoder once. This equals
        the textbook formulation (two ``autograd.grad`` calls on the last layer, then a full
        backward of the weighted sum) without its extra passes through LPIPS and the discriminator.
        """
        nll, rec, perceptual = self._nll(inputs, reconstruction)
        factor = self.gan_factor(step)
        g_loss = nll.new_zeros(())
        if factor > 0:
            with _no_param_grads(discriminator):
                g_loss = self.g_loss_fn(discriminator(reconstruction).float())
        weight = self._backward(reconstruction, nll, codebook_loss, g_loss, factor, last_layer, scale)
        terms = (rec, perceptual, codebook_loss, g_loss, weight)
        # fp32 values, combined in float64 as Python floats would be.
        values = torch.stack([t.detach().float() for t in terms]).double().unbind()
        logs: dict[str, torch.Tensor] = dict(zip(("rec_loss", "p_loss", "codebook_loss", "g_loss",
                                                          "d_weight"), values))
        logs["total"] = (
            self.rec_weight * logs["rec_loss"]
            + self.perceptual_weight * logs["p_loss"]
            + self.codebook_weight * logs["codebook_loss"]
            + logs["d_weight"] * factor * logs["g_loss"]
        )
        logs["gan_factor"] = values[0].new_full((), factor)
        return logs

    def _backward(
        self,
        reconstruction: torch.Tensor,
        nll: torch.Tensor,
        codebook_loss: torch.Tensor,
        g_loss: torch.Tensor,
        factor: float,
        last_layer: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """One backward each through LPIPS and the discriminator, one through the autoencoder."""
        (grad,) = torch.autograd.grad(nll, reconstruction)
        weight = nll.new_zeros(())
        if factor > 0:
            (gan_grad,) = torch.autograd.grad(g_loss, reconstruction)
            weight = nll.new_ones(())
            if self.use_adaptive_weight:
                (rec_last,) = torch.autograd.grad(reconstruction, last_layer, grad, retain_graph=True)
                (gan_last,) = torch.autograd.grad(reconstruction, last_layer, gan_grad, retain_graph=True)
                weight = self._adaptive(rec_last, gan_last)
            grad = grad + (weight * factor).to(grad.dtype) * gan_grad
        roots, root_grads = [reconstruction], [grad * scale]
        if codebook_loss.requires_grad:
            roots.append(codebook_loss)
            root_grads.append(torch.full_like(codebook_loss, self.codebook_weight * scale))
        torch.autograd.backward(roots, root_grads)
        return weight

    def discriminator_loss(
        self, inputs: torch.Tensor, reconstruction_detached: torch.Tensor, discriminator: nn.Module
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """GAN loss of the discriminator on real images vs detached reconstructions (+ LeCam term), and
        its terms and mean logits as float64 0-d tensors on the device.

        Call it only from ``disc_start`` on (``gan_factor(step) > 0``). In training mode the LeCam
        anchors are updated with this batch's mean logits before the regulariser is computed.
        """
        logits_real = discriminator(inputs.detach()).float()
        logits_fake = discriminator(reconstruction_detached.detach()).float()
        d_loss = self.d_loss_fn(logits_real, logits_fake)
        lecam = d_loss.new_zeros(())
        if self.lecam_weight > 0:
            if self.training:
                self.lecam.update(logits_real.detach().mean(), logits_fake.detach().mean())
            lecam = lecam_regularizer(logits_real, logits_fake, self.lecam.real, self.lecam.fake)
        loss = d_loss + self.lecam_weight * lecam
        values = torch.stack([t.detach() for t in (loss, d_loss, lecam, logits_real.mean(), logits_fake.mean())])
        keys = ("disc_loss", "d_loss", "lecam_loss", "logits_real", "logits_fake")
        return loss, dict(zip(keys, values.double().unbind()))

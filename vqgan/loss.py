"""Stage-1 training objective: reconstruction, perceptual, codebook and adversarial terms.

:class:`VQGANLoss` runs the autoencoder's backward pass itself (:meth:`VQGANLoss.generator_backward`)
so that the adaptive GAN weight costs no extra backward passes through LPIPS or the discriminator,
and gives the discriminator's loss on detached reconstructions (:meth:`VQGANLoss.discriminator_loss`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vqgan.lpips import LPIPS

ADAPTIVE_EPS = 1e-4


def reconstruction_loss(inputs: torch.Tensor, reconstruction: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """Mean absolute (``l1``) or squared (``l2``) pixel error, computed in fp32."""
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


class VQGANLoss(nn.Module):
    """The VQGAN objective; keyword arguments mirror the ``loss`` config section.

    Autoencoder loss = ``rec_weight`` * rec + ``perceptual_weight`` * LPIPS + ``codebook_weight`` * codebook
    + w * ``gan_factor(step)`` * generator loss, where w is the adaptive weight
    ||grad (rec + perceptual)|| / (||grad gan|| + 1e-4) at the decoder's last layer (clamped to
    ``adaptive_weight_max``) or 1 when ``adaptive_weight`` is off. With ``perceptual_weight`` 0 no
    LPIPS is built, so no weight files are needed.
    """

    def __init__(
        self,
        *,
        rec_loss: str = "l1",
        rec_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        codebook_weight: float = 1.0,
        disc_start: int = 10000,
        disc_weight: float = 0.8,
        disc_loss: str = "hinge",
        adaptive_weight: bool = True,
        adaptive_weight_max: float = 1e4,
        disc_warmup_steps: int = 0,
        lecam_weight: float = 0.0,
        lecam_decay: float = 0.999,
        lpips_vgg_path: str | Path | None = None,
        lpips_heads_path: str | Path | None = None,
    ) -> None:
        super().__init__()
        if rec_loss not in ("l1", "l2"):
            raise ValueError(f"rec_loss must be 'l1' or 'l2', got {rec_loss!r}.")
        if disc_loss not in GAN_LOSSES:
            raise ValueError(f"disc_loss must be one of {', '.join(GAN_LOSSES)}, got {disc_loss!r}.")
        self.rec_loss = rec_loss
        self.rec_weight = rec_weight
        self.perceptual_weight = perceptual_weight
        self.codebook_weight = codebook_weight
        self.disc_start = disc_start
        self.disc_weight = disc_weight
        self.d_loss_fn, self.g_loss_fn = GAN_LOSSES[disc_loss]
        self.use_adaptive_weight = adaptive_weight
        self.adaptive_weight_max = adaptive_weight_max
        self.disc_warmup_steps = disc_warmup_steps
        self.lecam_weight = lecam_weight
        self.lecam_decay = lecam_decay
        self.lpips = LPIPS(lpips_vgg_path, lpips_heads_path) if perceptual_weight > 0 else None
        self.register_buffer("lecam_anchor_real", torch.zeros(()), persistent=False)
        self.register_buffer("lecam_anchor_fake", torch.zeros(()), persistent=False)
        self.register_buffer("lecam_anchor_ready", torch.zeros((), dtype=torch.bool), persistent=False)

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
        fused: bool = True,
    ) -> dict[str, float]:
        """Backpropagate ``scale`` * autoencoder loss into the autoencoder; return the terms as floats.

        ``last_layer`` is the weight of the decoder's final convolution. The discriminator runs only
        when ``gan_factor(step) > 0`` and its parameters receive no gradients (pass the bare module,
        not a DDP wrapper). ``fused`` takes the gradients of the reconstruction(+perceptual) loss and
        of the GAN loss with respect to ``reconstruction`` once each, derives the last-layer gradient
        norms from them, and sends the combined gradient through the decoder once; ``fused=False``
        is the reference formulation (two ``autograd.grad`` calls on the last layer, then a full
        backward) and gives the same gradients.
        """
        nll, rec, perceptual = self._nll(inputs, reconstruction)
        factor = self.gan_factor(step)
        g_loss = nll.new_zeros(())
        if factor > 0:
            with _no_param_grads(discriminator):
                g_loss = self.g_loss_fn(discriminator(reconstruction).float())
        backward = self._backward_fused if fused else self._backward_reference
        weight = backward(reconstruction, nll, codebook_loss, g_loss, factor, last_layer, scale)
        terms = (rec, perceptual, codebook_loss, g_loss, weight)
        values = torch.stack([t.detach().float() for t in terms]).tolist()
        logs = dict(zip(("rec_loss", "p_loss", "codebook_loss", "g_loss", "d_weight"), values))
        logs["total"] = (
            self.rec_weight * logs["rec_loss"]
            + self.perceptual_weight * logs["p_loss"]
            + self.codebook_weight * logs["codebook_loss"]
            + logs["d_weight"] * factor * logs["g_loss"]
        )
        logs["gan_factor"] = factor
        return logs

    def _backward_fused(
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

    def _backward_reference(
        self,
        reconstruction: torch.Tensor,
        nll: torch.Tensor,
        codebook_loss: torch.Tensor,
        g_loss: torch.Tensor,
        factor: float,
        last_layer: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        """The straightforward formulation: gradients of both losses at the last layer, then one full backward."""
        total = nll + self.codebook_weight * codebook_loss
        weight = nll.new_zeros(())
        if factor > 0:
            weight = nll.new_ones(())
            if self.use_adaptive_weight:
                (rec_last,) = torch.autograd.grad(nll, last_layer, retain_graph=True)
                (gan_last,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
                weight = self._adaptive(rec_last, gan_last)
            total = total + weight * factor * g_loss
        (total * scale).backward()
        return weight

    @torch.no_grad()
    def _update_anchors(self, mean_real: torch.Tensor, mean_fake: torch.Tensor) -> None:
        ready, decay = self.lecam_anchor_ready, self.lecam_decay
        for anchor, value in ((self.lecam_anchor_real, mean_real), (self.lecam_anchor_fake, mean_fake)):
            anchor.copy_(torch.where(ready, decay * anchor + (1.0 - decay) * value, value))
        ready.fill_(True)

    def discriminator_loss(
        self, inputs: torch.Tensor, reconstruction_detached: torch.Tensor, discriminator: nn.Module, step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """GAN loss of the discriminator on real images vs detached reconstructions (+ LeCam term).

        The loss is multiplied by 0 before ``disc_start`` and 1 from then on; callers skip the call
        before ``disc_start`` to save the work. In training mode the LeCam anchors are updated with
        this batch's mean logits before the regulariser is computed.
        """
        logits_real = discriminator(inputs.detach()).float()
        logits_fake = discriminator(reconstruction_detached.detach()).float()
        d_loss = self.d_loss_fn(logits_real, logits_fake)
        lecam = d_loss.new_zeros(())
        if self.lecam_weight > 0:
            if self.training:
                self._update_anchors(logits_real.detach().mean(), logits_fake.detach().mean())
            lecam = lecam_regularizer(logits_real, logits_fake, self.lecam_anchor_real, self.lecam_anchor_fake)
        factor = 1.0 if step >= self.disc_start else 0.0
        loss = factor * (d_loss + self.lecam_weight * lecam)
        values = torch.stack([t.detach() for t in (loss, d_loss, lecam, logits_real.mean(), logits_fake.mean())])
        keys = ("disc_loss", "d_loss", "lecam_loss", "logits_real", "logits_fake")
        return loss, dict(zip(keys, values.tolist()))

    def training_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint needs to resume the loss: the LeCam anchors (never the LPIPS weights)."""
        return {
            "lecam_anchor_real": self.lecam_anchor_real.detach().clone(),
            "lecam_anchor_fake": self.lecam_anchor_fake.detach().clone(),
            "lecam_anchor_ready": self.lecam_anchor_ready.detach().clone(),
        }

    def load_training_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`training_state` returned."""
        expected = self.training_state()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise KeyError(f"loss training state: missing keys {missing}, unexpected keys {unexpected}.")
        for key in expected:
            getattr(self, key).copy_(state[key])

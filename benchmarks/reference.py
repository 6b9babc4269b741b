"""The textbook stage-1 step, as the reference implementation takes it: the opponent the benchmark times
against :func:`vqgan.training.stage1_step`, and what the tests prove that step equal to.

The adaptive GAN weight comes from two ``autograd.grad`` calls on the decoder's last layer (each
retracing LPIPS or the discriminator), then one backward of the weighted sum; the discriminator
step runs a second autoencoder forward (without autograd recording) to get its fake images.
"""

from __future__ import annotations

import torch

from utils.training import clip_gradients
from vqgan import VQGAN, Discriminator, VQGANLoss
from vqgan.loss import adaptive_weight


def reference_generator_backward(loss_fn: VQGANLoss, inputs: torch.Tensor, reconstruction: torch.Tensor,
                                 codebook_loss: torch.Tensor, disc: Discriminator, last_layer: torch.Tensor,
                                 step: int, scale: float = 1.0) -> dict[str, float]:
    """Backpropagate ``scale`` * the autoencoder loss the straightforward way; the same logs as
    ``generator_backward``."""
    nll, rec, perceptual = loss_fn._nll(inputs, reconstruction)
    factor = loss_fn.gan_factor(step)
    total = nll + loss_fn.codebook_weight * codebook_loss
    g_loss, weight = nll.new_zeros(()), nll.new_zeros(())
    if factor > 0:
        disc.requires_grad_(False)
        g_loss = loss_fn.g_loss_fn(disc(reconstruction).float())
        disc.requires_grad_(True)
        weight = nll.new_ones(())
        if loss_fn.use_adaptive_weight:
            (rec_last,) = torch.autograd.grad(nll, last_layer, retain_graph=True)
            (gan_last,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
            weight = adaptive_weight(rec_last.norm(), gan_last.norm(), loss_fn.adaptive_weight_max)
        total = total + weight * factor * g_loss
    (total * scale).backward()
    values = [float(t.detach()) for t in (rec, perceptual, codebook_loss, g_loss, weight)]
    logs = dict(zip(("rec_loss", "p_loss", "codebook_loss", "g_loss", "d_weight"), values))
    logs["total"] = (loss_fn.rec_weight * logs["rec_loss"] + loss_fn.perceptual_weight * logs["p_loss"]
                     + loss_fn.codebook_weight * logs["codebook_loss"] + logs["d_weight"] * factor * logs["g_loss"])
    logs["gan_factor"] = factor
    return logs


def reference_stage1_step(model: VQGAN, disc: Discriminator, loss_fn: VQGANLoss, opt_ae: torch.optim.Optimizer,
                          opt_disc: torch.optim.Optimizer, images: torch.Tensor, step: int,
                          grad_clip: float) -> dict[str, float]:
    """One optimizer step of both networks on one batch, taken the straightforward way (fp32, no skipping)."""
    opt_ae.zero_grad(set_to_none=True)
    opt_disc.zero_grad(set_to_none=True)
    out = model(images)
    logs = reference_generator_backward(loss_fn, images, out.reconstruction, out.codebook_loss, disc,
                                        model.last_layer_weight, step)
    if loss_fn.gan_factor(step) > 0:
        model.eval()  # same function here (no dropout or batch statistics); leaves the codebook statistics alone
        with torch.no_grad():
            fake = model(images).reconstruction
        model.train()
        d_loss, d_logs = loss_fn.discriminator_loss(images, fake, disc)
        d_loss.backward()
        logs.update({key: float(value) for key, value in d_logs.items()})
        clip_gradients(disc, grad_clip)
        opt_disc.step()
    model.quantizer.end_step()
    clip_gradients(model, grad_clip)
    opt_ae.step()
    return logs

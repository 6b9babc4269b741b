"""The stage-1 training step: one optimizer step of the autoencoder and the discriminator.

``train_vqgan.py`` calls :func:`stage1_step` once per step of its loop; the benchmarks and the tests
call the same function, so what is measured and tested is what trains.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from utils.training import ModelEMA, TensorSnapshot, autocast, clip_gradients, first_nonfinite, grad_sync
from vqgan.discriminator import Discriminator
from vqgan.loss import VQGANLoss
from vqgan.model import VQGAN


def stage1_step(model: VQGAN, disc: Discriminator, loss_fn: VQGANLoss, opt_ae: torch.optim.Optimizer,
                opt_disc: torch.optim.Optimizer, micro_batches: Sequence[torch.Tensor], step: int, *,
                grad_clip: float, amp_dtype: torch.dtype | None = None, ema: ModelEMA | None = None,
                train_model: nn.Module | None = None, train_disc: nn.Module | None = None) -> dict[str, float]:
    """One optimizer step on ``micro_batches`` (images [B, C, H, W] each, gradients accumulated).

    Per micro-batch: the autoencoder forward, the loss's generator backward (reconstruction,
    LPIPS, codebook and, from ``loss_fn.disc_start`` on, the adaptively weighted GAN term), then
    the discriminator's loss on the detached reconstruction. Then both gradient norms are clipped
    to ``grad_clip``; if any loss or gradient norm is non-finite the step is undone (gradients
    dropped, codebook/BatchNorm/LeCam state restored) and ``{"nonfinite": name}`` is returned.
    Otherwise the quantizer closes its step, the optimizers step, ``ema`` follows the weights and
    the mean losses, gradient norm and codebook statistics are returned.

    ``train_model`` / ``train_disc`` are the modules to run forward (DDP or compiled wrappers of
    ``model`` / ``disc``; default: the bare ones). The learning rates are the caller's to set.
    """
    train_model = train_model or model
    train_disc = train_disc or disc
    device = micro_batches[0].device
    opt_ae.zero_grad(set_to_none=True)
    opt_disc.zero_grad(set_to_none=True)
    disc_active = loss_fn.gan_factor(step) > 0
    snapshot = TensorSnapshot([*model.quantizer.parameters(), *model.buffers(), *disc.buffers(), *loss_fn.buffers()])
    totals: dict[str, float] = {}
    for i, images in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with grad_sync(train_model, last), autocast(device, amp_dtype):
            out = train_model(images)
            logs = loss_fn.generator_backward(images, out.reconstruction, out.codebook_loss, disc,
                                              model.last_layer, step, scale=1 / len(micro_batches))
        if disc_active:
            with grad_sync(train_disc, last), autocast(device, amp_dtype):
                d_loss, d_logs = loss_fn.discriminator_loss(images, out.reconstruction.detach(), train_disc)
            (d_loss / len(micro_batches)).backward()
            logs.update(d_logs)
        for key, value in logs.items():
            totals[key] = totals.get(key, 0.0) + value / len(micro_batches)
    grad_norm = clip_gradients(model, grad_clip)
    disc_norm = clip_gradients(disc, grad_clip)
    bad = first_nonfinite({**totals, "autoencoder gradient": grad_norm, "discriminator gradient": disc_norm})
    if bad is not None:
        opt_ae.zero_grad(set_to_none=True)
        opt_disc.zero_grad(set_to_none=True)
        snapshot.restore()
        return {"nonfinite": bad}
    model.quantizer.end_step()
    opt_ae.step()
    if disc_active:
        opt_disc.step()
    if ema is not None:
        ema.update(model)
    totals.update(grad_norm=float(grad_norm), usage=model.quantizer.codebook_usage(),
                  perplexity=model.quantizer.window_perplexity())
    return totals

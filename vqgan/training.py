"""The stage-1 training step: one optimizer step of the autoencoder and the discriminator.

``train_vqgan.py`` calls :func:`stage1_step` once per step of its loop; the benchmarks and the tests
call the same function, so what is measured and tested is what trains.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from utils.training import (
    ModelEMA,
    NonFiniteCheck,
    TensorSnapshot,
    autocast,
    clip_gradients,
    grad_sync,
    optimizer_step,
)
from vqgan.discriminator import Discriminator
from vqgan.loss import VQGANLoss
from vqgan.model import VQGAN


def stage1_step(model: VQGAN, disc: Discriminator, loss_fn: VQGANLoss, opt_ae: torch.optim.Optimizer,
                opt_disc: torch.optim.Optimizer, micro_batches: Sequence[torch.Tensor], step: int, *,
                grad_clip: float, amp_dtype: torch.dtype | None = None, ema: ModelEMA | None = None,
                train_model: nn.Module | None = None,
                train_disc: nn.Module | None = None) -> tuple[dict[str, torch.Tensor], NonFiniteCheck]:
    """One optimizer step on ``micro_batches`` (images [B, C, H, W] each, gradients accumulated).

    Per micro-batch: the autoencoder forward, the loss's generator backward (reconstruction,
    LPIPS, codebook and, from ``loss_fn.disc_start`` on, the adaptively weighted GAN term), then
    the discriminator's loss on the detached reconstruction. Then both gradient norms are clipped
    to ``grad_clip``, the quantizer closes its step, the optimizers step and ``ema`` follows the
    weights. If any loss or gradient norm is non-finite the step is undone: no update, and the
    codebook/BatchNorm/LeCam state as it was before the step.

    Nothing is read on the host, on any device: the step is undone on the device (see
    :mod:`utils.training`). Returns the logs, every value a 0-d tensor on the device (mean losses,
    gradient norm, codebook statistics; read them only when they are logged, with
    :func:`utils.logging.as_floats`), and the step's :class:`utils.training.NonFiniteCheck`, which says,
    when read, whether the step was skipped and why.

    ``train_model`` / ``train_disc`` are the modules to run forward (DDP or compiled wrappers of
    ``model`` / ``disc``; default: the bare ones). The learning rates are the caller's to set.
    """
    train_model = model if train_model is None else train_model  # a compiled module has no truth value
    train_disc = disc if train_disc is None else train_disc
    device = micro_batches[0].device
    opt_ae.zero_grad(set_to_none=True)
    opt_disc.zero_grad(set_to_none=True)
    disc_active = loss_fn.gan_factor(step) > 0
    snapshot = TensorSnapshot([*model.quantizer.parameters(), *model.buffers(), *disc.buffers(), *loss_fn.buffers()])
    totals: dict[str, torch.Tensor] = {}
    for i, images in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with grad_sync(train_model, last), autocast(device, amp_dtype):
            out = train_model(images)
            logs = loss_fn.generator_backward(images, out.reconstruction, out.codebook_loss, disc,
                                              model.last_layer_weight, step, scale=1 / len(micro_batches))
        if disc_active:
            with grad_sync(train_disc, last), autocast(device, amp_dtype):
                d_loss, d_logs = loss_fn.discriminator_loss(images, out.reconstruction.detach(), train_disc)
            (d_loss / len(micro_batches)).backward()
            logs.update(d_logs)
        for key, value in logs.items():
            totals[key] = totals.get(key, 0.0) + value / len(micro_batches)
    grad_norm = clip_gradients(model, grad_clip)
    disc_norm = clip_gradients(disc, grad_clip)
    check = NonFiniteCheck({**totals, "autoencoder gradient": grad_norm, "discriminator gradient": disc_norm})
    model.quantizer.end_step()
    snapshot.restore(where=check.found)
    optimizer_step(opt_ae, check.found)
    if disc_active:
        optimizer_step(opt_disc, check.found)
    if ema is not None:
        ema.update(model, check.found)
    usage, perplexity = model.quantizer.window_statistics()
    totals.update(grad_norm=grad_norm, usage=usage, perplexity=perplexity)
    return totals, check

"""The stage-1 training step: one optimizer step of the autoencoder and the discriminator.

``train_vqgan.py`` calls :func:`stage1_step` once per step of its loop; the benchmarks and the tests
call the same function, so what is measured and tested is what trains.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from utils.device import reads_stall
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
                train_model: nn.Module | None = None, train_disc: nn.Module | None = None,
                sync_free: bool | None = None) -> dict[str, Any]:
    """One optimizer step on ``micro_batches`` (images [B, C, H, W] each, gradients accumulated).

    Per micro-batch: the autoencoder forward, the loss's generator backward (reconstruction,
    LPIPS, codebook and, from ``loss_fn.disc_start`` on, the adaptively weighted GAN term), then
    the discriminator's loss on the detached reconstruction. Then both gradient norms are clipped
    to ``grad_clip``, the quantizer closes its step, the optimizers step and ``ema`` follows the
    weights. If any loss or gradient norm is non-finite the step is undone: no update, and the
    codebook/BatchNorm/LeCam state as it was before the step.

    Returns the mean losses, gradient norm and codebook statistics as 0-d tensors on the device
    (``gan_factor`` as a float); read them only when they are logged. How a non-finite step is
    detected depends on ``sync_free`` (default: on devices other than the CPU):

    * host check (the CPU): the check is read at once, and a skipped step returns only
      ``{"nonfinite": name}``;
    * ``sync_free``: nothing is read on the host; the step is undone on the device (see
      :mod:`utils.training`) and the logs carry ``"nonfinite"``: a :class:`utils.training.NonFiniteCheck`
      that says, when read, whether the step was skipped and why.

    ``train_model`` / ``train_disc`` are the modules to run forward (DDP or compiled wrappers of
    ``model`` / ``disc``; default: the bare ones). The learning rates are the caller's to set.
    """
    train_model = model if train_model is None else train_model  # a compiled module has no truth value
    train_disc = disc if train_disc is None else train_disc
    device = micro_batches[0].device
    sync_free = reads_stall(device) if sync_free is None else sync_free
    opt_ae.zero_grad(set_to_none=True)
    opt_disc.zero_grad(set_to_none=True)
    disc_active = loss_fn.gan_factor(step) > 0
    snapshot = TensorSnapshot([*model.quantizer.parameters(), *model.buffers(), *disc.buffers(), *loss_fn.buffers()])
    totals: dict[str, Any] = {}
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
    check = NonFiniteCheck({**{k: v for k, v in totals.items() if isinstance(v, torch.Tensor)},
                            "autoencoder gradient": grad_norm, "discriminator gradient": disc_norm})
    skip = check.found if sync_free else None
    if not sync_free:
        cause = check.cause()
        if cause is not None:
            opt_ae.zero_grad(set_to_none=True)
            opt_disc.zero_grad(set_to_none=True)
            snapshot.restore()
            return {"nonfinite": cause}
    model.quantizer.end_step(sync_free=sync_free)
    if skip is not None:
        snapshot.restore(where=skip)
    optimizer_step(opt_ae, skip)
    if disc_active:
        optimizer_step(opt_disc, skip)
    if ema is not None:
        ema.update(model, skip)
    usage, perplexity = model.quantizer.window_statistics()
    totals.update(grad_norm=grad_norm, usage=usage, perplexity=perplexity)
    if skip is not None:
        totals["nonfinite"] = check
    return totals

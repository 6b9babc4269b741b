"""The stage-2 training step: one optimizer step of the GPT prior on cached code indices.

``train_transformer.py`` calls :func:`stage2_step` once per step of its loop; the benchmarks and the
tests call the same function.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from transformer.prior import VQGANPrior
from utils.training import ModelEMA, autocast, clip_gradients, first_nonfinite, grad_sync


def stage2_step(prior: VQGANPrior, optimizer: torch.optim.Optimizer,
                micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor | None]], *, grad_clip: float,
                amp_dtype: torch.dtype | None = None, ema: ModelEMA | None = None,
                train_prior: nn.Module | None = None) -> dict[str, float]:
    """One optimizer step on ``micro_batches`` of (indices [B, h*w], labels [B] or None), gradients accumulated.

    The next-code cross-entropy of each micro-batch is backpropagated, the GPT's gradient norm is
    clipped to ``grad_clip``, and, if the loss and the norm are finite, the optimizer steps and
    ``ema`` follows the GPT's weights. Returns the mean loss (nats and bits per token) and the
    gradient norm, or ``{"nonfinite": name}`` for a skipped step. ``train_prior`` is the module to
    run forward (a DDP or compiled wrapper of ``prior``; default: ``prior``).
    """
    train_prior = train_prior or prior
    device = micro_batches[0][0].device
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for i, (indices, labels) in enumerate(micro_batches):
        with grad_sync(train_prior, i == len(micro_batches) - 1):
            with autocast(device, amp_dtype):
                loss = train_prior(indices, labels)
            (loss / len(micro_batches)).backward()
        total += loss.item() / len(micro_batches)
    grad_norm = clip_gradients(prior.gpt, grad_clip)
    bad = first_nonfinite({"loss": total, "gradient": grad_norm})
    if bad is not None:
        optimizer.zero_grad(set_to_none=True)
        return {"nonfinite": bad}
    optimizer.step()
    if ema is not None:
        ema.update(prior.gpt)
    return {"loss": total, "bits_per_token": total / math.log(2), "grad_norm": float(grad_norm)}

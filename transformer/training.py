"""The stage-2 training step: one optimizer step of the GPT prior on cached code indices.

``train_transformer.py`` calls :func:`stage2_step` once per step of its loop; the benchmarks and the
tests call the same function.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from transformer.prior import VQGANPrior
from utils.training import ModelEMA, NonFiniteCheck, autocast, clip_gradients, grad_sync, optimizer_step


def stage2_step(prior: VQGANPrior, optimizer: torch.optim.Optimizer,
                micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor | None]], *, grad_clip: float,
                amp_dtype: torch.dtype | None = None, ema: ModelEMA | None = None,
                train_prior: nn.Module | None = None) -> tuple[dict[str, torch.Tensor], NonFiniteCheck]:
    """One optimizer step on ``micro_batches`` of (indices [B, h*w], labels [B] or None), gradients accumulated.

    The next-code cross-entropy of each micro-batch is backpropagated, the GPT's gradient norm is
    clipped to ``grad_clip``, and, if the loss and the norm are finite, the optimizer steps and
    ``ema`` follows the GPT's weights. Returns the mean loss (nats and bits per token) and the
    gradient norm as 0-d tensors on the device, and the step's non-finite check; a non-finite step is
    skipped on the device, as :func:`vqgan.training.stage1_step` does.
    ``train_prior`` is the module to run forward (a DDP or compiled wrapper of ``prior``; default:
    ``prior``).
    """
    train_prior = prior if train_prior is None else train_prior  # a compiled module has no truth value
    device = micro_batches[0][0].device
    optimizer.zero_grad(set_to_none=True)
    total: Any = 0.0
    for i, (indices, labels) in enumerate(micro_batches):
        with grad_sync(train_prior, i == len(micro_batches) - 1):
            with autocast(device, amp_dtype):
                loss = train_prior(indices, labels)
            (loss / len(micro_batches)).backward()
        total = total + loss.detach().double() / len(micro_batches)
    grad_norm = clip_gradients(prior.gpt, grad_clip)
    check = NonFiniteCheck({"loss": total, "gradient": grad_norm})
    optimizer_step(optimizer, check.found)
    if ema is not None:
        ema.update(prior.gpt, check.found)
    return {"loss": total, "bits_per_token": total / math.log(2), "grad_norm": grad_norm}, check

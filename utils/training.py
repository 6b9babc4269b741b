"""Pieces both training steps and both training scripts use: optimizer and learning-rate schedule,
autocast, gradient clipping, micro-batch gradient sync, weight EMA, and undoing a skipped step."""

from __future__ import annotations

import contextlib
import copy
import math
import random
from typing import Any

import torch


def make_adam(params: Any, lr: float, betas: tuple[float, float], weight_decay: float,
              device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused on CUDA."""
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay,
                             fused=device.type == "cuda")


def lr_factor(step: int, warmup_steps: int, max_steps: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at ``step``: linear warmup, then constant or cosine to ``min_ratio``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device``; nothing when ``dtype`` is None (full fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_sync(module: torch.nn.Module, last_micro_batch: bool) -> contextlib.AbstractContextManager:
    """Skip the DDP gradient all-reduce on all but the last micro-batch of a step (no-op without DDP)."""
    if not last_micro_batch and hasattr(module, "no_sync"):
        return module.no_sync()
    return contextlib.nullcontext()


def clip_gradients(module: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradient norm of ``module``'s parameters to ``max_norm`` (0 = no clipping); the norm before."""
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(())
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)


def first_nonfinite(values: dict[str, float | torch.Tensor]) -> str | None:
    """Name of the first value that is NaN or infinite, or None."""
    for name, value in values.items():
        if not math.isfinite(float(value)):
            return name
    return None


class ModelEMA:
    """Exponential moving average of a module's parameters (buffers are copied)."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for ema_p, p in zip(self.module.parameters(), module.parameters()):
            ema_p.lerp_(p.detach(), 1 - self.decay)
        for ema_b, b in zip(self.module.buffers(), module.buffers()):
            ema_b.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)


class TensorSnapshot:
    """Copies of tensors that a forward pass changes in place (codebook statistics and restarts,
    BatchNorm statistics, LeCam anchors), so that a skipped step can be undone completely."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors
        self.saved = [t.detach().clone() for t in tensors]

    @torch.no_grad()
    def restore(self) -> None:
        for tensor, saved in zip(self.tensors, self.saved):
            tensor.copy_(saved)


def set_seed(seed: int) -> None:
    """Seed Python's and torch's generators (numpy is only used with explicit generators)."""
    random.seed(seed)
    torch.manual_seed(seed)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

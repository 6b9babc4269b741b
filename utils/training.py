"""Pieces both training steps and both training scripts use: optimizer and learning-rate schedule,
autocast, gradient clipping, micro-batch gradient sync, weight EMA, and undoing a skipped step.

A non-finite step is skipped the same way on every device, without reading anything on the host: the
check is a device flag (:class:`NonFiniteCheck`), and :meth:`TensorSnapshot.restore`, :func:`optimizer_step`
and :meth:`ModelEMA.update` take that flag and act on the device (``torch.where``), so a CUDA step
queues its work and returns while the GPU is still computing. The flag is read with the logs.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
from typing import Any

import torch

FUSED_ADAM_DEVICES = ("cuda", "cpu")


def make_adam(params: Any, lr: float, betas: tuple[float, float], weight_decay: float,
              device: torch.device) -> torch.optim.AdamW:
    """AdamW with the fused kernel (one pass over each parameter, and its step count kept on the
    parameters' device, where :func:`optimizer_step` can put it back); multi-tensor elsewhere."""
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay,
                             fused=device.type in FUSED_ADAM_DEVICES)


def compile_module(module: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile(module)`` as the training steps need it.

    The stage-1 step takes the adaptive weight's last-layer gradients with ``retain_graph=True`` before
    its one full backward; a compiled backward allows that only without donated buffers, so they are
    turned off (a process-wide setting of torch.compile).
    """
    import torch._functorch.config as functorch_config

    if hasattr(functorch_config, "donated_buffer"):
        functorch_config.donated_buffer = False
    return torch.compile(module)


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
    """Clip the gradient norm of ``module``'s parameters to ``max_norm`` (0 = no clipping); the norm before,
    a 0-d tensor on the parameters' device (0 when no parameter has a gradient)."""
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return torch.zeros((), device=next(module.parameters(), torch.zeros(())).device)
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)


class NonFiniteCheck:
    """Which of a step's named values (losses, gradient norms; 0-d tensors on one device) are NaN or
    infinite, computed on the device.

    :attr:`found` is a 0-d bool tensor that the skipping helpers of this module take as it is;
    :meth:`cause` reads the flags on the host, which waits for the device on CUDA.
    """

    def __init__(self, values: dict[str, torch.Tensor]) -> None:
        self.names = list(values)
        self.flags = ~torch.isfinite(torch.stack([value.detach().double() for value in values.values()]))
        self.found = self.flags.any()

    def cause(self) -> str | None:
        """Name of the first non-finite value, or None."""
        return next((name for name, bad in zip(self.names, self.flags.tolist()) if bad), None)


@torch.no_grad()
def optimizer_step(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """``optimizer.step()``, undone where the 0-d bool tensor ``skip`` is true, decided on the device.

    The parameters that have gradients and their optimizer state (Adam's moments and step count) are
    copied before the step and put back with ``torch.where`` after it; state the step created (a
    parameter's first step) is zeroed, which is how the optimizer starts it. State kept on another
    device than ``skip`` (the step count of a non-fused Adam on CUDA) is moved to it and back.
    """
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    state = [t for p in params for t in optimizer.state.get(p, {}).values() if isinstance(t, torch.Tensor)]
    fresh = [p for p in params if not optimizer.state.get(p)]
    saved = TensorSnapshot([*params, *state])
    optimizer.step()
    saved.restore(where=skip)
    for p in fresh:
        for t in optimizer.state[p].values():
            if isinstance(t, torch.Tensor):
                t.copy_(torch.where(skip.to(t.device), 0, t))


class ModelEMA:
    """Exponential moving average of a module's parameters (buffers are copied)."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module, skip: torch.Tensor) -> None:
        """Move the average towards ``module``'s weights and copy its buffers; where the 0-d bool tensor
        ``skip`` is true, leave everything as it is (decided on the device)."""
        weight = torch.where(skip, 0.0, 1 - self.decay)
        for ema_p, p in zip(self.module.parameters(), module.parameters()):
            ema_p.lerp_(p.detach(), weight.to(ema_p.dtype))
        for ema_b, b in zip(self.module.buffers(), module.buffers()):
            ema_b.copy_(torch.where(skip, ema_b, b))

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
    def restore(self, where: torch.Tensor | None = None) -> None:
        """Put the saved values back; only where the 0-d bool tensor ``where`` is true, if given (decided
        on the device, so the caller need not read it)."""
        for tensor, saved in zip(self.tensors, self.saved):
            tensor.copy_(saved if where is None else torch.where(where.to(tensor.device), saved, tensor))


def set_seed(seed: int) -> None:
    """Seed Python's and torch's generators (numpy is only used with explicit generators)."""
    random.seed(seed)
    torch.manual_seed(seed)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

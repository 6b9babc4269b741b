"""Linear layers whose fp32 CPU matrix products run on oneDNN instead of the default BLAS.

PyTorch multiplies fp32 matrices on x86 CPUs with MKL, and MKL takes a slow code path on some CPUs:
on an AMD EPYC with AVX-512 it reached less than half of oneDNN's rate (oneDNN ships with PyTorch)
on the GPT's training products, and 2.3x less on the 16-row products of sampling.
:func:`linear` computes ``F.linear`` with oneDNN for fp32 CPU tensors of two or more dimensions,
forward and backward, and falls back to ``F.linear`` everywhere else: CUDA, other dtypes, 1-D or
empty inputs, CPU autocast (whose bf16 products already run on oneDNN), code traced by
``torch.compile``, oneDNN switched off (``torch.backends.mkldnn.flags(enabled=False)``) or not built.
The results are fp32 products like ``F.linear``'s, summed in another order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import FunctionCtx, once_differentiable


def _onednn_built() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


ONEDNN_BUILT = _onednn_built()


def onednn_enabled() -> bool:
    """oneDNN is in this build of PyTorch and not switched off."""
    return ONEDNN_BUILT and torch.backends.mkldnn.enabled


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` for 2-D ``x`` [M, K] and ``weight`` [N, K] (any strides) on oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _product(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(weight if x.requires_grad else None, rows if weight.requires_grad else None)
        ctx.input_shape = x.shape
        return _product(rows, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weight, rows = ctx.saved_tensors
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _product(grad_rows, weight.t(), None).view(ctx.input_shape)
        if ctx.needs_input_grad[1]:
            grad_weight = _product(grad_rows.t(), rows.t(), None)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(0)
        return grad_x, grad_weight, grad_bias


def uses_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether :func:`linear` takes the oneDNN path for these operands (see the module docstring)."""
    cpu_fp32 = [t.device.type == "cpu" and t.dtype == torch.float32 for t in (x, weight, bias) if t is not None]
    return (onednn_enabled() and all(cpu_fp32) and x.dim() >= 2 and x.numel() > 0 and weight.numel() > 0
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, on oneDNN for fp32 CPU tensors (see the module docstring)."""
    if not uses_onednn(x, weight, bias):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _OneDNNLinear.apply(x, weight, bias)
    return _forward(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) whose forward is :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

"""Linear layers whose fp32 CPU matrix products run on oneDNN instead of the default BLAS.

PyTorch multiplies fp32 matrices on x86 CPUs with MKL, and MKL takes a slow code path on some CPUs
(on an AMD EPYC with AVX-512 it reached 185 GFLOP/s where oneDNN, which PyTorch also ships, reached
430 on the same 1024 x 256 x 1024 product, and 2.3x faster on the 16-row products of sampling).
:func:`linear` computes ``F.linear`` with oneDNN for fp32 tensors on CPU, forward and backward, and
falls back to ``F.linear`` everywhere else: CUDA, other dtypes, CPU autocast (whose bf16 products
already run on oneDNN), code traced by ``torch.compile``, or a PyTorch built without oneDNN. The
results are fp32 products like ``F.linear``'s, summed in another order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _onednn_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


ONEDNN = _onednn_available()


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` for 2-D ``x`` [M, K] and ``weight`` [N, K] (any strides) on oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(rows, weight)
        ctx.has_bias = bias is not None
        ctx.input_shape = x.shape
        return _product(rows, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        rows, weight = ctx.saved_tensors
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _product(grad_rows, weight.t(), None).view(ctx.input_shape)
        if ctx.needs_input_grad[1]:
            grad_weight = _product(grad_rows.t(), rows.t(), None)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(0)
        return grad_x, grad_weight, grad_bias


def uses_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`linear` takes the oneDNN path for these operands (never inside ``torch.compile``,
    which chooses its own kernels)."""
    return (ONEDNN and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and x.dim() >= 2
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, on oneDNN for fp32 CPU tensors (see the module docstring)."""
    if not uses_onednn(x, weight):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _OneDNNLinear.apply(x, weight, bias)
    return _product(x.reshape(-1, x.shape[-1]), weight, bias).view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) whose forward is :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

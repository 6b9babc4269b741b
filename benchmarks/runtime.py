"""How a benchmark variant runs on its device: autocast precision, memory format, AdamW, backend flags.

The optimized runtime is what the training scripts use: fused AdamW, and on CUDA also bf16 autocast
(the quantizer stays in fp32), ``channels_last``, TF32 and cuDNN autotuning. The reference runtime
has none of these.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from utils.device import autocast_dtype, configure_backends
from utils.training import FUSED_ADAM_DEVICES, autocast, make_adam


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    fused_adam: bool
    fast_backends: bool

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.amp_dtype)

    def adam(self, params: Any, lr: float, betas: tuple[float, float], weight_decay: float) -> torch.optim.AdamW:
        if self.fused_adam:
            return make_adam(params, lr, betas, weight_decay, self.device)
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)

    @contextlib.contextmanager
    def backends(self) -> Iterator[None]:
        """TF32 and cuDNN autotuning on or off (CUDA) for the duration of a call; restored afterwards."""
        if self.device.type != "cuda":
            yield
            return
        flags = (torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32"), \
            (torch.backends.cudnn, "benchmark")
        saved = [getattr(owner, name) for owner, name in flags]
        if self.fast_backends:
            configure_backends(self.device)
        else:
            for owner, name in flags:
                setattr(owner, name, False)
        try:
            yield
        finally:
            for (owner, name), value in zip(flags, saved):
                setattr(owner, name, value)

    def describe(self) -> str:
        parts = [str(self.amp_dtype).removeprefix("torch.") + " autocast" if self.amp_dtype else "fp32"]
        parts += [label for label, on in (("channels_last", self.channels_last), ("fused AdamW", self.fused_adam),
                                          ("TF32 + cudnn.benchmark", self.fast_backends)) if on]
        return ", ".join(parts)


def optimized(device: torch.device) -> Runtime:
    cuda = device.type == "cuda"
    return Runtime(device, autocast_dtype(device, "auto"), channels_last=cuda,
                   fused_adam=device.type in FUSED_ADAM_DEVICES, fast_backends=cuda)


def reference(device: torch.device) -> Runtime:
    return Runtime(device, None, channels_last=False, fused_adam=False, fast_backends=False)

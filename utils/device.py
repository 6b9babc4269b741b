"""Where and in what precision a run computes: device choice, backend flags, autocast dtype, and what
the run reports about its machine (environment line, peak memory)."""

from __future__ import annotations

import os
import platform
import resource
import warnings

import torch

from utils.config import ConfigError
from utils.distributed import DistInfo


def resolve_device(spec: str, info: DistInfo) -> torch.device:
    """``auto`` -> CUDA if available else CPU; under torchrun each rank takes its local GPU."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={spec} but CUDA is not available. Use train.device=cpu or auto.")
        if device.index is None:
            device = torch.device("cuda", info.local_rank)
    return device


def device_type_of(spec: str) -> str:
    """``cuda`` or ``cpu``: the kind of device ``train.device`` asks for, known before any process starts."""
    return "cuda" if spec.startswith("cuda") or (spec == "auto" and torch.cuda.is_available()) else "cpu"


def configure_backends(device: torch.device) -> None:
    """TF32 matmuls/convs and cuDNN autotuning on CUDA."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def conv_memory_format(device: torch.device, channels_last: bool, compiled: bool) -> torch.memory_format:
    """The memory format for convolutional models and their images: ``channels_last`` (when asked for)
    on CUDA, and on the CPU for models under ``torch.compile``, whose CPU convolutions run channels_last
    whatever the parameters' layout (with contiguous parameters the compiled step would convert every
    convolution weight and its gradient in each step). Eager CPU steps stay contiguous, where
    channels_last was slower in the benchmarks."""
    wanted = channels_last and (device.type == "cuda" or compiled)
    return torch.channels_last if wanted else torch.contiguous_format


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX) where bf16 is emulated without them
    (x86); read from the CPU flags Linux reports, and assumed elsewhere, where they cannot be read."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not os.path.exists("/proc/cpuinfo"):
        return True
    with open("/proc/cpuinfo") as handle:
        flags = next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """bf16 under ``auto`` on CUDA, on CPU only when asked; None means full fp32."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if device.type == "cpu" and not cpu_has_native_bf16():
        warnings.warn("train.precision=bf16 on a CPU without native bf16 (AVX512-BF16 or AMX) is emulated and "
                      "several times slower than fp32: set train.precision=fp32", stacklevel=2)
    return torch.bfloat16


def describe_environment(device: torch.device, info: DistInfo) -> str:
    threads = torch.get_num_threads()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({threads} threads)"
    return f"{device} [{where}], {info.world_size} process(es), pid {os.getpid()}"


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far: max allocated on CUDA, peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB

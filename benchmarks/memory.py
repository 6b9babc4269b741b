"""Peak memory of the benchmark process: resident set size on CPU, allocated tensor memory on CUDA.

On Linux the peak RSS (``VmHWM``) can be reset through ``/proc/self/clear_refs``, so each timed
call gets its own peak. Where that is not possible the figure falls back to ``getrusage``'s
``ru_maxrss``, the peak since the process started. :func:`release_freed_memory` hands memory
freed by earlier benchmarks back to the system first, so it does not count towards the next one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import sys
from pathlib import Path

import torch

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
RESET_PEAK_RSS = "5"


def _hwm_bytes() -> int | None:
    """``VmHWM`` of this process in bytes, or None where /proc is not available."""
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def release_freed_memory(device: torch.device) -> None:
    """Collect garbage and return freed heap (glibc ``malloc_trim``) or cached CUDA blocks to the system."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name) if libc_name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


class PeakMemory:
    """Resettable peak-memory meter for ``device``; :attr:`kind` says what is measured."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.resettable = device.type == "cuda" or (_hwm_bytes() is not None and self._clear_peak_rss())

    @staticmethod
    def _clear_peak_rss() -> bool:
        try:
            CLEAR_REFS.write_text(RESET_PEAK_RSS)
        except OSError:
            return False
        return True

    @property
    def kind(self) -> str:
        if self.device.type == "cuda":
            return "max allocated CUDA memory during the call"
        if self.resettable:
            return "peak RSS of the process during the call"
        return "peak RSS of the process since it started"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.resettable:
            self._clear_peak_rss()

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        hwm = _hwm_bytes() if self.resettable else None
        return hwm if hwm is not None else _maxrss_bytes()

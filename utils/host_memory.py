"""Keeping freed host memory inside the process (glibc on Linux), for training on the CPU.

By default glibc hands large freed blocks straight back to the kernel: blocks above its mmap threshold
(128 KiB, raised as it sees larger ones), and the top of the heap once more than twice that lies
free. A training step frees its activations and allocates the same sizes again in the next step, so
every one of those pages is faulted in anew on first touch. On the 2-core AMD EPYC VM the benchmarks
ran on, the fashion_mnist_small stage-1 step took 22,000-42,000 page faults per step, about 5% of its
time; with freed blocks kept, none.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc's largest mmap threshold on 64-bit systems; larger blocks are still mapped and unmapped each time.
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
# Free memory at the top of the heap is returned to the kernel only beyond this (mallopt takes an int).
TRIM_THRESHOLD_BYTES = 2**31 - 1


def uses_glibc() -> bool:
    """Whether this process runs on Linux with glibc, whose allocator :func:`keep_freed_memory` tunes."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks of up to 32 MiB for reuse instead of returning them to the kernel;
    True when the setting took effect, False where the C library is not glibc (macOS, Windows, musl)."""
    if not uses_glibc():
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
                and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))

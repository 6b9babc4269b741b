"""Freed host memory stays in the process on CPU runs: re-allocating a step's worth of tensors costs no
page faults (glibc only; elsewhere the setting reports that it did not apply)."""

import platform
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from utils.host_memory import keep_freed_memory, uses_glibc

ROOT = Path(__file__).resolve().parent.parent
BLOCK_PAGES = 16 * 1024 * 1024 // resource.getpagesize()
# Allocate, touch and free eight 16 MiB blocks a few times, then count the page faults of one more round.
# The blocks come from libc's malloc directly (as PyTorch's CPU tensors do): with nothing else allocated
# between them, glibc's defaults hand them back to the kernel every round.
PATTERN = f"""
import ctypes, ctypes.util, resource, sys
import torch
sys.path.insert(0, {str(ROOT)!r})
from utils.device import configure_backends
if sys.argv[1] == "configured":
    configure_backends(torch.device("cpu"))
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 16 * 1024 * 1024
def round_():
    blocks = [libc.malloc(size) for _ in range(8)]
    for block in blocks:
        ctypes.memset(block, 1, size)
    for block in reversed(blocks):
        libc.free(block)
for _ in range(3):
    round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults_of_one_round(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", PATTERN, mode], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not uses_glibc(), reason="glibc only")
def test_cpu_runs_reuse_freed_memory_without_page_faults() -> None:
    assert faults_of_one_round("default") > 4 * BLOCK_PAGES  # the pattern faults with glibc's defaults
    assert faults_of_one_round("configured") < BLOCK_PAGES


def test_other_c_libraries_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    assert keep_freed_memory() is False

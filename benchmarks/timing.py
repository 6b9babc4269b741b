"""Alternating timing of benchmark variants: warm-up, repetitions, medians and paired speed-ups.

Variants of one benchmark are timed in turns (A B, then B A, ...) so that a slow phase of a shared
machine hits all of them alike; a speed-up is the median over repetitions of the ratio of the two
times measured back to back.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.memory import PeakMemory, release_freed_memory


@dataclass
class Timing:
    """Seconds of each timed repetition and the largest peak memory seen during them."""

    seconds: list[float]
    peak_bytes: int

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(
    variants: Mapping[str, Callable[[], object]],
    device: torch.device,
    *,
    reps: int,
    warmup: int,
    warmups: Mapping[str, Callable[[], object]] | None = None,
) -> dict[str, Timing]:
    """Time each variant ``reps`` times, in alternating order, after ``warmup`` untimed calls of each.

    ``warmups`` replaces the warm-up calls (e.g. a shorter run of the same code) where given.
    """
    names = list(variants)
    warm = warmups or variants
    release_freed_memory(device)
    meter = PeakMemory(device)
    for _ in range(warmup):
        for name in names:
            warm[name]()
            synchronize(device)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    peaks: dict[str, int] = dict.fromkeys(names, 0)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            synchronize(device)
            meter.reset()
            start = time.perf_counter()
            variants[name]()
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
            peaks[name] = max(peaks[name], meter.peak_bytes())
    return {name: Timing(seconds[name], peaks[name]) for name in names}


def paired_speedup(fast: Timing, slow: Timing) -> float:
    """Median over repetitions of slow time / fast time (the two were timed back to back)."""
    return statistics.median(s / f for f, s in zip(fast.seconds, slow.seconds))


def count_flops(fn: Callable[[], object]) -> int:
    """Floating-point operations of one call, as counted by ``torch.utils.flop_counter``."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def convolution_share(fn: Callable[[], object]) -> dict[str, float]:
    """Where one CPU call's time goes: the share of its wall time spent inside convolution kernels, and
    their GFLOP/s.

    Profiles one call (``torch.profiler``, CPU activity) and counts its convolution FLOPs
    (``torch.utils.flop_counter``); kernel time is the self time of the ATen operators named
    ``*conv*``, the rate is convolution FLOPs over that time. The profiler slows the many small
    operations down more than the large ones, so the share it gives for convolutions errs low.
    """
    from torch.profiler import ProfilerActivity, profile

    with FlopCounterMode(display=False) as counter:
        fn()
    per_op = counter.get_flop_counts().get("Global", {})
    conv_flops = sum(count for op, count in per_op.items() if "conv" in str(op))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        fn()
        wall_us = (time.perf_counter() - started) * 1e6
    conv_us = sum(event.self_cpu_time_total for event in prof.key_averages()
                  if event.key.startswith("aten::") and "conv" in event.key)
    if conv_flops and not conv_us:
        raise RuntimeError("convolution FLOPs were counted but no convolution kernel was profiled.")
    return {"convolution_time_share": conv_us / wall_us,
            "convolution_gflop_per_s": conv_flops / (conv_us * 1e-6) / 1e9 if conv_us else 0.0,
            "convolution_gflop": conv_flops / 1e9}

"""Speed benchmarks of both stages; prints a table and writes the figures as JSON.

    python -m benchmarks.run [--device cpu|cuda] [--quick] [--out FILE.json] [--threads N]

Every figure is the median of several timed repetitions after warm-up (synchronised on CUDA).
Variants of a benchmark are timed alternately in the same run, and a speed-up is the median of
their paired time ratios. The full run takes about 25 minutes on 2 quiet CPU cores, half of it
in the recompute sampling baseline (the GPT over the growing sequence, 256 times per repetition);
``--quick`` takes a few minutes.

On a CPU shared with other busy processes, ``--threads 1`` avoids intra-op threads waiting for
each other on every operator, which otherwise dominates small operators such as one decoding step.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks import stage1, stage2
from benchmarks.cli import benchmark_parser, parse_benchmark_args
from benchmarks.lpips_weights import write_random_lpips_weights
from benchmarks.memory import PeakMemory
from benchmarks.report import print_and_save
from benchmarks.runtime import optimized, reference
from benchmarks.stage1 import Stage1Case
from benchmarks.stage2 import GPTCase
from benchmarks.taming_compare import (
    COMPARISONS,
    INSTALL_HINT,
    reference_available,
    run_comparison,
    vs_taming_targets,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
QUICKSTART = str(CONFIGS / "quickstart.yaml")
F16 = str(CONFIGS / "imagenet_f16.yaml")
FASHION_SMALL = str(CONFIGS / "fashion_mnist_small.yaml")
TINY_MODEL = ("model.ch=8", "model.ch_mult=[1,2]", "model.num_res_blocks=1", "model.attn_resolutions=[8]",
              "model.z_channels=4", "model.embed_dim=4", "model.codebook_size=16", "model.codebook_dim=4",
              "disc.ndf=8", "disc.n_layers=2", "data.image_size=16")
STAGE1_TARGET, SAMPLING_TARGET, COMPILED_TARGET = 1.25, 10.0, 1.0


@dataclass(frozen=True)
class Scale:
    """What one mode runs: stage-1 cases, the GPT, repetitions, and which entries the targets read."""

    stage1: tuple[Stage1Case, ...]
    compiled: tuple[Stage1Case, ...]
    gpt: GPTCase
    reps: int
    warmup: int
    sampling_reps: int
    warmup_tokens: int
    target_case: str
    stage1_at_target: bool
    sampling_at_target: bool
    compiled_sampling: bool = True  # compiled vs eager sampling (inductor compiles for a while on a CPU)


FULL_GPT = GPTCase(n_layer=8, n_head=8, n_embd=512, codebook_size=1024, seq_len=256, train_batch=8,
                   sample_batch=16, sample_tokens=256)
SCALES = {
    "full": Scale(
        stage1=(Stage1Case("quickstart", QUICKSTART, (), 32),
                Stage1Case("f16-64", F16, ("data.image_size=64",), 8),
                Stage1Case("f16-128", F16, ("data.image_size=128",), 4)),
        compiled=(Stage1Case("fashion_mnist_small", FASHION_SMALL, (), 16),
                  Stage1Case("f16-64", F16, ("data.image_size=64",), 4)),
        gpt=FULL_GPT, reps=5, warmup=1, sampling_reps=3, warmup_tokens=8,
        target_case="f16-64", stage1_at_target=True, sampling_at_target=True),
    "quick": Scale(
        stage1=(Stage1Case("quickstart", QUICKSTART, (), 8),
                Stage1Case("f16-64", F16, ("data.image_size=64",), 2),
                Stage1Case("f16-128", F16, ("data.image_size=128",), 1)),
        compiled=(Stage1Case("fashion_mnist_small", FASHION_SMALL, (), 16),),
        gpt=GPTCase(n_layer=8, n_head=8, n_embd=512, codebook_size=1024, seq_len=256, train_batch=2,
                    sample_batch=16, sample_tokens=64),
        reps=2, warmup=1, sampling_reps=2, warmup_tokens=4,
        target_case="f16-64", stage1_at_target=True, sampling_at_target=False),
    "tiny": Scale(
        stage1=(Stage1Case("quickstart-tiny", QUICKSTART, TINY_MODEL, 2),
                Stage1Case("f16-tiny", F16, TINY_MODEL, 2)),
        compiled=(Stage1Case("quickstart-tiny", QUICKSTART, TINY_MODEL, 2),),
        gpt=GPTCase(n_layer=2, n_head=2, n_embd=32, codebook_size=16, seq_len=16, train_batch=2,
                    sample_batch=4, sample_tokens=16),
        reps=1, warmup=1, sampling_reps=1, warmup_tokens=2,
        target_case="f16-tiny", stage1_at_target=False, sampling_at_target=False, compiled_sampling=False),
}

NOTES = [
    "LPIPS runs with random weights of the right shapes (no download); timing does not depend on the values.",
    "optimized stage-1 step: one autoencoder forward, fused generator backward, discriminator step on the "
    "detached reconstruction.",
    "straightforward stage-1 step: adaptive weight from two autograd.grad calls on the last layer, then a full "
    "backward; a second autoencoder forward (without autograd recording) for the discriminator step.",
    "'rec only' = perceptual and GAN losses off; 'rec+LPIPS+GAN' = both on, GAN active. With the GAN off both "
    "variants do the same work, so their 'rec only' speed-up shows the timing noise.",
    "speed-up = median over repetitions of the paired time ratio of variants timed alternately.",
    "FLOPs from torch.utils.flop_counter (matmuls, convolutions, attention); optimizer arithmetic not counted.",
]


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _meta(device: torch.device, mode: str) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "mode": mode, "device": str(device), "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
        "runtimes": {"optimized": optimized(device).describe(), "reference": reference(device).describe()},
        "memory": PeakMemory(device).kind, "notes": NOTES, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):
        meta["load_average_start"] = os.getloadavg()
    return meta


def _targets(results: list[dict[str, Any]], scale: Scale, ceiling: dict[str, Any] | None) -> list[dict[str, Any]]:
    by_key = {result["key"]: result for result in results}
    stage1_value = by_key[f"stage1_train/{scale.target_case}/full"]["speedup"]
    sampling_value = by_key[f"sampling/{scale.gpt.name}"]["speedup"]
    return vs_taming_targets(results, ceiling, scale.sampling_at_target) + [
        {"name": "stage-1 step with LPIPS+GAN at 64x64, optimized over straightforward", "value": stage1_value,
         "need": STAGE1_TARGET, "met": stage1_value >= STAGE1_TARGET, "at_target_size": scale.stage1_at_target},
        {"name": "KV-cache sampling over full recompute, 256 tokens, batch 16, 8-layer 512-wide GPT",
         "value": sampling_value, "need": SAMPLING_TARGET, "met": sampling_value >= SAMPLING_TARGET,
         "at_target_size": scale.sampling_at_target},
    ] + [
        {"name": f"{result['title']}: compiled over eager (compiling took {result['compile_s']:.0f} s)",
         "value": result["speedup"], "need": COMPILED_TARGET, "met": result["speedup"] >= COMPILED_TARGET,
         "at_target_size": scale.stage1_at_target}
        for result in results if result["key"].startswith("stage1_compiled/")
    ]


def run(scale: Scale, mode: str, device: torch.device,
        log: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """All benchmarks of ``scale``, in order, each printed to stderr as it completes; and the sampling
    ceiling measured beside the comparison with the reference (None when it is not installed)."""
    results: list[dict[str, Any]] = []

    def keep(result: dict[str, Any]) -> None:
        results.append(result)
        if log:
            speedup = f", {result['speedup']:.2f}x" if "speedup" in result else ""
            first = next(iter(result["variants"].values()))
            print(f"[{time.strftime('%H:%M:%S')}] {result['title']}: {first['per_s']:.1f} {result['unit']}{speedup}",
                  file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory() as folder:
        lpips_files = write_random_lpips_weights(Path(folder))
        for case in scale.stage1:
            for losses_on in (False, True):
                keep(stage1.bench_training(case, losses_on, lpips_files, device, reps=scale.reps,
                                           warmup=scale.warmup))
        for case in scale.compiled:
            keep(stage1.bench_compiled(case, lpips_files, device, reps=scale.reps, warmup=scale.warmup))
    for case in scale.stage1:
        for result in stage1.bench_codec(case, device, reps=scale.reps, warmup=scale.warmup):
            keep(result)
    keep(stage2.bench_training(scale.gpt, device, reps=scale.reps, warmup=scale.warmup))
    keep(stage2.bench_sampling(scale.gpt, device, reps=scale.sampling_reps, warmup=scale.warmup,
                               warmup_tokens=scale.warmup_tokens))
    if scale.compiled_sampling:
        keep(stage2.bench_compiled_sampling(scale.gpt, device, reps=scale.sampling_reps, warmup=scale.warmup))
    if not reference_available():
        print(f"side-by-side with taming-transformers skipped: the reference is not installed ({INSTALL_HINT})",
              file=sys.stderr)
        return results, None
    return results, run_comparison(COMPARISONS[mode], device, keep)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, mode, device = parse_benchmark_args(benchmark_parser(__doc__), argv)
    meta = _meta(device, mode)
    results, ceiling = run(SCALES[mode], mode, device, log=not args.tiny)
    if hasattr(os, "getloadavg"):
        meta["load_average_end"] = os.getloadavg()
    meta["vs_taming"] = ceiling if ceiling is not None else "skipped: taming-transformers is not installed"
    report = {"meta": meta, "results": results, "targets": _targets(results, SCALES[mode], ceiling)}
    where = f"{meta['gpu']}" if device.type == "cuda" else f"{meta['cpu']}, {meta['threads']} threads"
    print(f"Benchmarks ({mode}) on {device} [{where}], torch {meta['torch']}")
    print_and_save(report, NOTES, args.out)
    return report


if __name__ == "__main__":
    main()

"""Stage-2 benchmarks: GPT training throughput (the step ``train_transformer.py`` takes), sampling with the
KV cache vs full recompute, and compiled vs eager sampling (``sample.compile``).

``python -m benchmarks.run`` runs them all; compiled vs eager sampling alone:

    python -m benchmarks.stage2 [--device cpu|cuda] [--quick] [--threads N] [--out FILE.json]
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.cli import benchmark_parser, parse_benchmark_args
from benchmarks.report import print_and_save, record
from benchmarks.runtime import Runtime, optimized, reference
from benchmarks.timing import count_flops, time_alternating
from transformer import GPT, VQGANPrior, sample_tokens
from transformer.config import Stage2Config
from transformer.prior import PriorConfig
from transformer.training import stage2_step
from utils.config import TrainConfig, load_config
from vqgan import VQGAN, VQGANConfig

QUICKSTART_PRIOR = Path(__file__).resolve().parent.parent / "configs" / "quickstart_transformer.yaml"


@dataclass(frozen=True)
class GPTCase:
    """A GPT over ``codebook_size`` codes plus a start token, on sequences of ``seq_len`` tokens."""

    n_layer: int
    n_head: int
    n_embd: int
    codebook_size: int
    seq_len: int
    train_batch: int
    sample_batch: int
    sample_tokens: int

    @property
    def name(self) -> str:
        return f"{self.n_layer}L-{self.n_embd}w"

    def build(self, device: torch.device, seed: int = 0) -> GPT:
        """The GPT alone (sampling)."""
        torch.manual_seed(seed)
        block = max(self.seq_len, self.sample_tokens)
        return GPT(self.codebook_size + 1, block, self.n_layer, self.n_head, self.n_embd, dropout=0.0,
                   positions="learned", out_vocab_size=self.codebook_size).to(device)

    def build_prior(self, device: torch.device, seed: int = 0) -> VQGANPrior:
        """An unconditional prior with this GPT, around a minimal VQGAN with the right codebook and token grid."""
        side = math.isqrt(self.seq_len)
        torch.manual_seed(seed)
        vqgan = VQGAN(VQGANConfig(codebook_size=self.codebook_size, embed_dim=4, ch=4, ch_mult=(1,), z_channels=4,
                                  attn_resolutions=()), in_channels=3, resolution=side)
        config = PriorConfig(n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd, condition="none")
        return VQGANPrior(vqgan, config).to(device)


def training_settings() -> TrainConfig:
    """The optimizer settings of the quickstart prior's config."""
    return load_config(Stage2Config, QUICKSTART_PRIOR).train


def _train_step(prior: VQGANPrior, optimizer: torch.optim.Optimizer, runtime: Runtime, indices: torch.Tensor,
                grad_clip: float) -> None:
    with runtime.backends():
        stage2_step(prior, optimizer, [(indices, None)], grad_clip=grad_clip, amp_dtype=runtime.amp_dtype)


def bench_training(case: GPTCase, device: torch.device, *, reps: int, warmup: int) -> dict[str, Any]:
    """Tokens/s of a GPT training step (forward, backward, clipping, AdamW)."""
    runtimes = {"optimized": optimized(device)}
    if reference(device) != runtimes["optimized"]:
        runtimes["reference"] = reference(device)
    generator = torch.Generator().manual_seed(0)
    indices = torch.randint(case.codebook_size, (case.train_batch, case.seq_len), generator=generator).to(device)
    train = training_settings()
    variants = {}
    for name, runtime in runtimes.items():
        prior = case.build_prior(device).train()
        optimizer = runtime.adam(prior.param_groups(train.weight_decay), train.lr, train.betas, 0.0)
        variants[name] = lambda p=prior, o=optimizer, r=runtime: _train_step(p, o, r, indices, train.grad_clip)
    timings = time_alternating(variants, device, reps=reps, warmup=warmup)
    flops = {name: count_flops(fn) for name, fn in variants.items()}
    return record(f"stage2_train/{case.name}", f"stage-2 train GPT {case.name} {case.seq_len} tok b{case.train_batch}",
                  "tok/s", case.train_batch * case.seq_len, timings, flops=flops,
                  extra={"n_layer": case.n_layer, "n_embd": case.n_embd, "seq_len": case.seq_len,
                         "batch": case.train_batch})


def bench_sampling(case: GPTCase, device: torch.device, *, reps: int, warmup: int,
                   warmup_tokens: int) -> dict[str, Any]:
    """Tokens/s of sampling ``sample_tokens`` tokens with the KV cache vs recomputing the sequence each step.

    Warm-up calls sample ``warmup_tokens`` tokens. The entry also says whether both paths drew the
    same tokens from the same generator seed.
    """
    gpt = case.build(device).eval()
    prefix = torch.full((case.sample_batch, 1), case.codebook_size, dtype=torch.long, device=device)
    drawn: dict[str, torch.Tensor] = {}

    def run(use_cache: bool, tokens: int) -> None:
        generator = torch.Generator(device).manual_seed(0)
        with optimized(device).backends():
            out = sample_tokens(gpt, prefix, tokens, generator=generator, use_cache=use_cache)
        drawn["cache" if use_cache else "recompute"] = out

    variants = {"KV cache": lambda: run(True, case.sample_tokens), "recompute": lambda: run(False, case.sample_tokens)}
    warmups = {"KV cache": lambda: run(True, warmup_tokens), "recompute": lambda: run(False, warmup_tokens)}
    timings = time_alternating(variants, device, reps=reps, warmup=warmup, warmups=warmups)
    same = bool(torch.equal(drawn["cache"], drawn["recompute"])) if reps else None
    return record(f"sampling/{case.name}",
                  f"sampling GPT {case.name} {case.sample_tokens} tok b{case.sample_batch}",
                  "tok/s", case.sample_batch * case.sample_tokens, timings,
                  extra={"n_layer": case.n_layer, "n_embd": case.n_embd, "tokens": case.sample_tokens,
                         "batch": case.sample_batch, "same_tokens": same})


def bench_compiled_sampling(case: GPTCase, device: torch.device, *, reps: int, warmup: int) -> dict[str, Any]:
    """Tokens/s of KV-cache sampling with the one-token step under ``torch.compile`` (``compile=True``) vs
    eager, the same GPT and seed. The entry gives the first compiled call's seconds (compiling included)
    and whether both drew the same tokens."""
    gpt = case.build(device).eval()
    prefix = torch.full((case.sample_batch, 1), case.codebook_size, dtype=torch.long, device=device)
    drawn: dict[str, torch.Tensor] = {}

    def run(compiled: bool) -> None:
        generator = torch.Generator(device).manual_seed(0)
        with optimized(device).backends():
            out = sample_tokens(gpt, prefix, case.sample_tokens, compile=compiled, generator=generator)
        drawn["compiled" if compiled else "eager"] = out

    start = time.perf_counter()
    run(True)
    compile_s = time.perf_counter() - start
    timings = time_alternating({"compiled": lambda: run(True), "eager": lambda: run(False)}, device, reps=reps,
                               warmup=warmup)
    same = bool(torch.equal(drawn["compiled"], drawn["eager"]))
    return record(f"sampling_compiled/{case.name}",
                  f"sampling GPT {case.name} {case.sample_tokens} tok b{case.sample_batch}, compiled vs eager",
                  "tok/s", case.sample_batch * case.sample_tokens, timings,
                  extra={"n_layer": case.n_layer, "n_embd": case.n_embd, "tokens": case.sample_tokens,
                         "batch": case.sample_batch, "same_tokens": same, "compile_s": compile_s})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Compiled vs eager sampling for the GPT of ``benchmarks.run``'s scale; prints a table, writes JSON."""
    from benchmarks.run import SCALES

    args, mode, device = parse_benchmark_args(benchmark_parser(__doc__), argv)
    scale = SCALES[mode]
    result = bench_compiled_sampling(scale.gpt, device, reps=scale.sampling_reps, warmup=scale.warmup)
    report = {"meta": {"mode": mode, "device": str(device), "torch": torch.__version__,
                       "threads": torch.get_num_threads()}, "results": [result], "targets": []}
    print_and_save(report, [], args.out)
    return report


if __name__ == "__main__":
    main()

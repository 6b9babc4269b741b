"""Stage-2 benchmarks: GPT training throughput and sampling with the KV cache vs full recompute."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.report import record
from benchmarks.runtime import Runtime, optimized, reference
from benchmarks.timing import count_flops, time_alternating
from transformer import GPT, sample_tokens

LR, BETAS, WEIGHT_DECAY, GRAD_CLIP = 3e-4, (0.9, 0.95), 0.01, 1.0


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
        torch.manual_seed(seed)
        block = max(self.seq_len, self.sample_tokens)
        return GPT(self.codebook_size + 1, block, self.n_layer, self.n_head, self.n_embd,
                   out_vocab_size=self.codebook_size).to(device)


def _train_step(gpt: GPT, optimizer: torch.optim.Optimizer, runtime: Runtime, inputs: torch.Tensor,
                targets: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    with runtime.backends():
        with runtime.autocast():
            loss = gpt(inputs, targets)[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gpt.parameters(), GRAD_CLIP)
        optimizer.step()


def bench_training(case: GPTCase, device: torch.device, *, reps: int, warmup: int) -> dict[str, Any]:
    """Tokens/s of a GPT training step (forward, backward, clipping, AdamW)."""
    runtimes = {"optimized": optimized(device)}
    if reference(device) != runtimes["optimized"]:
        runtimes["reference"] = reference(device)
    generator = torch.Generator().manual_seed(0)
    shape = (case.train_batch, case.seq_len)
    inputs = torch.randint(case.codebook_size + 1, shape, generator=generator).to(device)
    targets = torch.randint(case.codebook_size, shape, generator=generator).to(device)
    variants = {}
    for name, runtime in runtimes.items():
        gpt = case.build(device).train()
        optimizer = runtime.adam(gpt.param_groups(WEIGHT_DECAY), LR, BETAS, WEIGHT_DECAY)
        variants[name] = lambda g=gpt, o=optimizer, r=runtime: _train_step(g, o, r, inputs, targets)
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

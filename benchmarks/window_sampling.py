"""Sliding-window sampling beyond the training grid, side by side with taming-transformers' loop.

    python -m benchmarks.window_sampling [--quick] [--device cpu|cuda] [--threads N] [--out FILE]

Taming samples large images in its scripts (``scripts/sample_conditional.py``, ``scripts/make_samples.py``):
for every code of the large grid it crops the window and the condition's window, runs the whole window through
its GPT and keeps the logits of the code's local position. Scripts are not modules, so :func:`taming_loop`
transcribes that loop over taming's own modules: its GPT (``taming.modules.transformer.mingpt.GPT``, the
``transformer`` of a ``Net2NetTransformer``) and ``Net2NetTransformer.top_k_logits``, then softmax and
``torch.multinomial`` as the script does. This repository's side is :func:`transformer.window.sample_windowed`
on the same weights (taming's GPT converted by :func:`transformer.taming.convert_gpt`).

Cases: a window of 8x8 codes (a 32x32 crop of a factor-4 VQGAN), the GPT 8 layers x 256 (8 heads) over 512
codes, batch 4, unconditional (one start token) and conditioned on a segmentation map (64 condition tokens per
window, cropped with it), on grids of 2x and 4x the window per side. Sampling is greedy (top-k 1), so both sides
must draw the same tokens, which is checked. Throughput is codes per second; both sides are timed alternately in
one process (:func:`benchmarks.timing.time_alternating`).
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.report import print_and_save, record
from benchmarks.taming_compare import import_reference, reference_benchmark_args
from benchmarks.timing import time_alternating
from transformer.gpt import GPT
from transformer.taming import convert_gpt
from transformer.window import sample_windowed, window_start

TARGET_SPEEDUP = 3.0  # codes per second over taming's loop on the same weights


@dataclass(frozen=True)
class WindowCase:
    """A GPT trained on ``window x window`` codes, sampled on grids of ``scales`` times the window per side."""

    window: int
    n_layer: int
    n_head: int
    n_embd: int
    codebook_size: int
    condition_vocab: int  # segmentation tokens (offset by the codebook size in this repository's layout)
    batch: int
    scales: tuple[int, ...]

    def prefix_len(self, conditioned: bool) -> int:
        return self.window * self.window if conditioned else 1


def taming_gpt(ref: types.SimpleNamespace, case: WindowCase, conditioned: bool, device: torch.device) -> nn.Module:
    """Taming's GPT with random weights; its vocabulary holds the codes and the condition tokens, which taming
    numbers from 0 like the codes (they share rows)."""
    torch.manual_seed(0)
    block = case.prefix_len(conditioned) + case.window ** 2 - 1
    gpt = ref.mingpt.GPT(max(case.codebook_size, case.condition_vocab), block, n_layer=case.n_layer,
                         n_head=case.n_head, n_embd=case.n_embd)
    with torch.no_grad():  # GPT-2's small initial weights give near-ties that rounding could break differently
        for weight in gpt.parameters():
            if weight.dim() > 1:
                weight.normal_(0.0, weight.shape[-1] ** -0.5)
    return gpt.to(device).eval()


def our_gpt(theirs: nn.Module, case: WindowCase, conditioned: bool, device: torch.device) -> GPT:
    """The same weights in this repository's GPT and token layout."""
    block = case.prefix_len(conditioned) + case.window ** 2 - 1
    vocab = case.condition_vocab if conditioned else 0
    gpt = GPT(case.codebook_size + vocab + 1, block, case.n_layer, case.n_head, case.n_embd, dropout=0.0,
              positions="learned", out_vocab_size=case.codebook_size)
    weights = convert_gpt({k: v.cpu() for k, v in theirs.state_dict().items()}, codebook_size=case.codebook_size,
                          condition_vocab=vocab, block_size=block, null_row=None if conditioned else 0)
    gpt.load_state_dict(weights)
    return gpt.to(device).eval()


@torch.no_grad()
def taming_loop(ref: types.SimpleNamespace, gpt: nn.Module, condition: torch.Tensor | None, grid: int,
                window: int, batch: int, top_k: int, start_token: int = 0) -> torch.Tensor:
    """Taming's sliding-window loop: for each code, the whole window (after the condition's window, or the start
    token) through the GPT; the logits of the code's local position, top-k, softmax, multinomial."""
    device = next(gpt.parameters()).device
    codes = torch.zeros(batch, grid, grid, dtype=torch.long, device=device)
    for i in range(grid):
        local_i = i - window_start(i, grid, window)
        for j in range(grid):
            local_j = j - window_start(j, grid, window)
            top, left = i - local_i, j - local_j
            patch = codes[:, top:top + window, left:left + window].reshape(batch, -1)
            if condition is None:
                prefix = torch.full((batch, 1), start_token, dtype=torch.long, device=device)
            else:
                prefix = condition[:, top:top + window, left:left + window].reshape(batch, -1)
            logits, _ = gpt(torch.cat((prefix, patch), dim=1)[:, :-1])
            logits = logits[:, -window * window:, :].reshape(batch, window, window, -1)[:, local_i, local_j, :]
            logits = ref.Net2NetTransformer.top_k_logits(None, logits, top_k)
            codes[:, i, j] = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)[:, 0]
    return codes


def compare(ref: types.SimpleNamespace, case: WindowCase, conditioned: bool, scale: int, device: torch.device,
            reps: int) -> dict[str, Any]:
    """Codes per second of both loops on one grid, after checking they draw the same codes."""
    theirs = taming_gpt(ref, case, conditioned, device)
    ours = our_gpt(theirs, case, conditioned, device)
    grid = case.window * scale
    condition = None
    if conditioned:
        condition = torch.randint(case.condition_vocab, (case.batch, grid, grid),
                                  generator=torch.Generator().manual_seed(1)).to(device)
    prefix = (condition + case.codebook_size if conditioned
              else torch.full((case.batch, 1), case.codebook_size, dtype=torch.long, device=device))
    drawn: dict[str, torch.Tensor] = {}

    def run_ours(size: int = grid) -> None:
        drawn["ours"] = sample_windowed(ours, prefix[..., :size, :size], (size, size), (case.window, case.window),
                                        top_k=1).view(case.batch, size, size)

    def run_theirs(size: int = grid) -> None:
        window_condition = None if condition is None else condition[..., :size, :size]
        drawn["theirs"] = taming_loop(ref, theirs, window_condition, size, case.window, case.batch, top_k=1)

    small = case.window + 1  # the warm-up: both loops on a grid one code larger than the window
    timings = time_alternating({"this repository": run_ours, "taming": run_theirs}, device, reps=reps, warmup=1,
                               warmups={"this repository": lambda: run_ours(small),
                                        "taming": lambda: run_theirs(small)})
    same = bool(torch.equal(drawn["ours"], drawn["theirs"]))
    kind = "segmentation" if conditioned else "unconditional"
    title = (f"sliding window {case.window}x{case.window} -> {grid}x{grid} codes ({scale}x), {kind}, "
             f"GPT {case.n_layer}x{case.n_embd}, batch {case.batch}, greedy")
    return record(f"window/{kind}/{scale}x", title, "codes/s", case.batch * grid * grid, timings,
                  extra={"same_tokens": same, "target": TARGET_SPEEDUP, "grid": grid, "window": case.window})


CASES = {
    "full": (WindowCase(window=8, n_layer=8, n_head=8, n_embd=256, codebook_size=512, condition_vocab=64, batch=4,
                        scales=(2, 4)), 2),
    "quick": (WindowCase(window=8, n_layer=8, n_head=8, n_embd=256, codebook_size=512, condition_vocab=64, batch=4,
                         scales=(2,)), 1),
    "tiny": (WindowCase(window=3, n_layer=1, n_head=2, n_embd=16, codebook_size=16, condition_vocab=5, batch=2,
                        scales=(2,)), 1),
}


def run(mode: str, device: torch.device, keep: Any) -> None:
    """Every case of ``mode``, each result passed to ``keep``."""
    ref = import_reference()
    case, reps = CASES[mode]
    for conditioned in (False, True):
        for scale in case.scales:
            keep(compare(ref, case, conditioned, scale, device, reps))


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parsed = reference_benchmark_args(__doc__, argv)
    if parsed is None:
        return None
    args, mode, device = parsed
    results: list[dict[str, Any]] = []
    run(mode, device, results.append)
    targets = [{"name": f"{r['title']}: this repository over taming", "value": r["speedup"], "need": TARGET_SPEEDUP,
                "met": r["speedup"] >= TARGET_SPEEDUP and r["same_tokens"], "at_target_size": mode == "full"}
               for r in results]
    report = {"meta": {"mode": mode, "device": str(device), "threads": torch.get_num_threads(),
                       "torch": torch.__version__}, "results": results, "targets": targets}
    print(f"Sliding-window sampling against taming-transformers' loop ({mode}) on {device}, "
          f"{torch.get_num_threads()} threads")
    print_and_save(report, [f"same tokens on both sides: {all(r['same_tokens'] for r in results)}"], args.out)
    return report


if __name__ == "__main__":
    main()

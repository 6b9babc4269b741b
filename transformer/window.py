"""Sampling a code grid of any size with a prior trained on smaller windows: taming's sliding window.

A prior trained on ``h x w`` code grids predicts the code at raster position ``(i, j)`` of a larger ``H x W``
grid from one ``h x w`` window of it: rows ``top .. top + h - 1`` and columns ``left .. left + w - 1``
(:func:`window_start`), after the condition's tokens cropped with the same slices when the condition is a map
(a class or start token stays as it is). Inside the window the code sits at ``(i - top, j - left)``, and
everything before it in the window's raster order is already sampled.

Taming's loop (``scripts/sample_conditional.py``) runs the whole window, ``L + h*w - 1`` tokens, through the
GPT for every code. :func:`sample_windowed` computes the same logits with less work:

* only the window's prefix up to the code goes through the GPT (causal attention never looks further);
* consecutive codes whose window stands still (the first and last columns, or every code when the grid is the
  training grid) form a run that decodes one token at a time with the KV cache, exactly as
  :func:`transformer.sampling.sample_tokens` does for plain sampling;
* a window that comes back in a later row (the first and last rows keep their windows' tops) keeps its KV cache
  and only appends the codes sampled since;
* the first tokens of a window fill its cache with causal attention over themselves (``prefill``);
* the samples of a batch go through together, and ``compile`` compiles the one-token step.

When the grid equals the window there is a single run, and this is plain sampling.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from transformer.gpt import GPT, KVCache
from transformer.sampling import SamplingConfig, cached_feed, check_sampling_options, draw_tokens, eval_mode

Progress = Callable[[torch.Tensor, int], None]


def window_start(index: int, size: int, window: int) -> int:
    """First row (column) of the window that predicts row (column) ``index`` of a grid ``size`` long.

    The window keeps ``index`` at its local position ``window // 2`` and stops at the grid's borders: the
    local position is ``index`` near the start and ``window - (size - index)`` near the end. For a window
    of 16 this is taming's rule (local ``i`` while ``i <= 8``, ``16 - (size - i)`` when ``size - i < 8``,
    else 8).
    """
    if not 0 <= index < size or window > size:
        raise ValueError(f"position {index} of a grid of {size} with a window of {window}: the position must lie "
                         "in the grid and the window must fit in it.")
    half = window // 2
    if index <= half:
        return 0
    if size - index < window - half:
        return size - window
    return index - half


class Run(NamedTuple):
    """Consecutive raster positions ``first .. first + count - 1`` of the grid that share the window whose
    top-left code is ``(top, left)``."""

    first: int
    count: int
    top: int
    left: int


def window_runs(grid: tuple[int, int], window: tuple[int, int], start: int = 0) -> list[Run]:
    """The raster positions ``start ..`` of a ``grid`` (H, W) of codes, in runs that share one window."""
    (height, width), (h, w) = grid, window
    runs: list[Run] = []
    for position in range(start, height * width):
        row, column = divmod(position, width)
        top, left = window_start(row, height, h), window_start(column, width, w)
        if runs and (runs[-1].top, runs[-1].left) == (top, left):
            runs[-1] = runs[-1]._replace(count=runs[-1].count + 1)
        else:
            runs.append(Run(position, 1, top, left))
    return runs


@torch.no_grad()
def sample_windowed(gpt: GPT, prefix: torch.Tensor, grid: tuple[int, int], window: tuple[int, int], *,
                    given: torch.Tensor | None = None, uncond_prefix: torch.Tensor | None = None,
                    temperature: float = SamplingConfig.temperature, top_k: int | None = SamplingConfig.top_k,
                    top_p: float | None = SamplingConfig.top_p, cfg_scale: float = SamplingConfig.cfg_scale,
                    compile: bool = SamplingConfig.compile, generator: torch.Generator | None = None,
                    window_caches: int = SamplingConfig.window_caches,
                    progress: Progress | None = None) -> torch.Tensor:
    """Sample a ``grid`` (H, W) of codes [B, H*W] with a GPT trained on ``window`` (h, w) grids.

    ``prefix``: the tokens before the codes, [B, L] for every window (a class or start token), or [B, H, W]
    for a condition map's tokens at the grid's size, cropped with each window (``L = h*w``).
    ``uncond_prefix`` [B, L]: the null condition of classifier-free guidance (``cfg_scale != 1``), for every
    window. ``given`` [B, k]: the first ``k`` codes of the grid in raster order, kept; the rest is sampled.
    ``window_caches``: how many KV caches of windows that will be used again (the first and last rows') are kept
    rather than recomputed; each holds ``B x n_layer x 2 x block_size x n_embd`` values. Sampling options as in
    :func:`transformer.sampling.sample_tokens`, whose tokens these are when the grid is the window.
    ``progress(codes, filled)`` is called after every sampled code with the grid so far [B, H*W], whose first
    ``filled`` codes in raster order are final (for a picture that fills in while it is sampled).
    """
    (height, width), (h, w) = grid, window
    batch = prefix.shape[0]
    spatial = prefix.dim() == 3
    if spatial and tuple(prefix.shape[1:]) != (height, width):
        raise ValueError(f"the condition's tokens cover a {tuple(prefix.shape[1:])} grid but the codes are sampled "
                         f"on a {(height, width)} grid; give the condition at the size of the sample.")
    guided = cfg_scale != 1.0
    if guided and uncond_prefix is None:
        raise ValueError("cfg_scale != 1 needs an uncond_prefix, the null condition of every window.")
    kept = 0 if given is None else given.shape[1]
    check_sampling_options(temperature, top_k, top_p, height * width - kept)
    codes = prefix.new_zeros(batch, height * width)
    if given is not None:
        codes[:, :kept] = given
    codes = codes.view(batch, height, width)
    options = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "cfg_scale": cfg_scale if guided else None,
               "generator": generator}
    runs = window_runs(grid, window, kept)
    last_run = {(run.top, run.left): k for k, run in enumerate(runs)}
    caches = WindowCaches(gpt, batch * (2 if guided else 1), window_caches)
    with eval_mode(gpt):
        for k, run in enumerate(runs):
            rows, columns = slice(run.top, run.top + h), slice(run.left, run.left + w)
            first_row, first_column = divmod(run.first, width)
            local = (first_row - run.top) * w + first_column - run.left
            before = codes[:, rows, columns].flatten(1)[:, :local]
            condition = prefix[:, rows, columns].flatten(1) if spatial else prefix
            sequence = torch.cat([condition, before], dim=1)
            if guided:
                sequence = torch.cat([sequence, torch.cat([uncond_prefix, before], dim=1)])
            key = (run.top, run.left)
            cache, cached = caches.take(key)
            length = sequence.shape[1]
            logits = gpt.forward_at(sequence[:, cached:], torch.arange(cached, length, device=sequence.device), cache,
                                    last_only=True, prefill=cached == 0)[:, -1]
            flat = codes.view(batch, -1)
            drawn = None if progress is None else lambda i, first=run.first: progress(flat, first + i)
            draw_tokens(logits, run.count, cached_feed(gpt, cache, length, compile),
                        out=flat[:, run.first:run.first + run.count], drawn=drawn, **options)
            caches.give_back(key, cache, length + run.count - 1, reused=last_run[key] > k)
    return codes.view(batch, -1)


class WindowCaches:
    """KV caches of windows, kept (up to ``keep``) for windows that come back, and recycled otherwise."""

    def __init__(self, gpt: GPT, batch: int, keep: int) -> None:
        self.gpt, self.batch, self.keep = gpt, batch, keep
        self.kept: dict[tuple[int, int], tuple[KVCache, int]] = {}
        self.spare: list[KVCache] = []

    def take(self, key: tuple[int, int]) -> tuple[KVCache, int]:
        """The cache of window ``key`` and how many of its positions hold the window's sequence (0: a fresh one)."""
        if key in self.kept:
            return self.kept.pop(key)
        return (self.spare.pop() if self.spare else self.gpt.new_cache(self.batch)), 0

    def give_back(self, key: tuple[int, int], cache: KVCache, filled: int, reused: bool) -> None:
        """Keep ``cache`` (its first ``filled`` positions) for window ``key`` if it is ``reused`` and there is room."""
        if reused and len(self.kept) < self.keep:
            self.kept[key] = (cache, filled)
        else:
            self.spare.append(cache)

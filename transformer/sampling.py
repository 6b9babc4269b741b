"""Autoregressive sampling from a GPT: temperature, top-k, top-p, classifier-free guidance.

``sample_tokens`` decodes a batch through the GPT's own forward with a preallocated KV cache (one new
position per step, :meth:`transformer.gpt.GPT.forward_at`) or, as the straightforward reference, by
recomputing the whole sequence every step. Both give the same tokens for the same generator state.
With ``compile=True`` the one-token step runs under ``torch.compile`` with static shapes, as in
gpt-fast: the cache has a fixed size and the position is a tensor, so one graph decodes every token
(on CUDA with CUDA graphs, ``mode="reduce-overhead"``, which removes the per-kernel launch cost that
dominates small decoding steps).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Optional

import torch

from transformer.gpt import GPT, KVCache
from utils.config import option


@dataclass
class SamplingConfig:
    """The ``sample`` config section; its defaults are also :func:`sample_tokens`'s (plain sampling)."""

    temperature: float = option(1.0, "softmax temperature")
    top_k: Optional[int] = option(None, "keep only the k most likely codes")
    top_p: Optional[float] = option(None, "keep the smallest set of codes whose probability reaches p")
    cfg_scale: float = option(1.0, "classifier-free guidance scale (1 = plain conditional)")
    compile: bool = option(False, "torch.compile the one-token decoding step (CUDA graphs on CUDA)")
    window_caches: int = option(
        64, "sampling beyond the training size: KV caches kept for windows that come back in a later row (each "
            "holds batch x n_layer x 2 x block_size x n_embd values); 0 recomputes them")


def check_filters(top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError for a top-k or top-p the filters cannot apply. Callers' settings are checked (with
    their config keys or flags) by :func:`transformer.config.check_sampling`; this guards direct calls."""
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}.")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top ``k`` and outside the nucleus of mass ``p``.

    Top-k keeps the ``k`` largest logits of each row. Top-p (applied after top-k) keeps the
    smallest set of most likely tokens whose probability sums to at least ``p``; the most likely
    token always survives. ``None`` disables a filter.
    """
    check_filters(top_k, top_p)
    if top_k is not None and top_k < logits.shape[-1]:
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep.scatter_(-1, torch.topk(logits, top_k, dim=-1).indices, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token [B, 1] per row of next-token ``logits`` [B, V], drawn from the filtered softmax.

    With top-k the draw runs over the ``k`` candidates only (the same distribution as filtering all
    ``V`` logits, without a softmax, mask and multinomial over the whole vocabulary every step).
    """
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        values, candidates = logits.topk(top_k, dim=-1)
        if top_p is not None:
            values = filter_logits(values, top_p=top_p)
        return candidates.gather(-1, _draw(values.softmax(dim=-1), generator))
    return _draw(filter_logits(logits, top_p=top_p).softmax(dim=-1), generator)


def _draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of ``probs`` [B, V]; drawn on the generator's device when it has one."""
    if generator is None or generator.device == probs.device:
        return torch.multinomial(probs, 1, generator=generator)
    return torch.multinomial(probs.to(generator.device), 1, generator=generator).to(probs.device)


@torch.no_grad()
def sample_tokens(gpt: GPT, prefix: torch.Tensor, num_tokens: int, *, temperature: float = SamplingConfig.temperature,
                  top_k: int | None = SamplingConfig.top_k, top_p: float | None = SamplingConfig.top_p,
                  cfg_scale: float = SamplingConfig.cfg_scale, compile: bool = SamplingConfig.compile,
                  uncond_prefix: torch.Tensor | None = None, generator: torch.Generator | None = None,
                  use_cache: bool = True) -> torch.Tensor:
    """Sample ``num_tokens`` tokens [B, num_tokens] after ``prefix`` [B, P].

    With ``cfg_scale != 1`` the conditional ``prefix`` and ``uncond_prefix`` (same shape) run as
    one doubled batch and the next-token logits are ``uncond + cfg_scale * (cond - uncond)``.
    ``compile`` runs the cached one-token step through ``torch.compile`` (see the module docstring);
    ``use_cache=False`` recomputes the full sequence at every step (slow reference path). The model
    is put in eval mode while sampling and restored afterwards.
    """
    check_sampling_options(temperature, top_k, top_p, num_tokens)
    guided = cfg_scale != 1.0
    if guided:
        if uncond_prefix is None or uncond_prefix.shape != prefix.shape:
            raise ValueError("cfg_scale != 1 needs an uncond_prefix of the same shape as prefix.")
        prefix = torch.cat([prefix, uncond_prefix])
    options = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "cfg_scale": cfg_scale if guided else None,
               "generator": generator}
    with eval_mode(gpt):
        if not use_cache:
            sequence = prefix

            def recompute(token: torch.Tensor) -> torch.Tensor:
                nonlocal sequence
                sequence = torch.cat([sequence, token], dim=1)
                return gpt(sequence)[0][:, -1]

            return draw_tokens(gpt(prefix)[0][:, -1], num_tokens, recompute, **options)
        length = prefix.shape[1]
        cache = gpt.new_cache(len(prefix), length + num_tokens - 1)
        logits = gpt.forward_at(prefix, torch.arange(length, device=prefix.device), cache, last_only=True,
                                prefill=True)[:, -1]
        return draw_tokens(logits, num_tokens, cached_feed(gpt, cache, length, compile), **options)


def check_sampling_options(temperature: float, top_k: int | None, top_p: float | None, num_tokens: int) -> None:
    """Raise ValueError for settings no sampler can use."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    check_filters(top_k, top_p)
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be at least 1, got {num_tokens}.")


@contextlib.contextmanager
def eval_mode(gpt: GPT) -> Iterator[None]:
    """The GPT in eval mode for the block, then back in the mode it had."""
    was_training = gpt.training
    gpt.eval()
    try:
        yield
    finally:
        gpt.train(was_training)


Feed = Callable[[torch.Tensor], torch.Tensor]


def draw_tokens(logits: torch.Tensor, num_tokens: int, feed: Feed, *, temperature: float, top_k: int | None,
                top_p: float | None, cfg_scale: float | None, generator: torch.Generator | None,
                out: torch.Tensor | None = None, drawn: Callable[[int], None] | None = None) -> torch.Tensor:
    """``num_tokens`` tokens [B, num_tokens]: the first drawn from the next-token ``logits``, each later one from the
    logits ``feed`` returns for the token before it. With ``cfg_scale`` the rows of ``logits`` are the conditional
    batch then the unconditional one, mixed before each draw, and ``feed`` gets every token for both.

    The tokens are written into ``out`` [B, num_tokens] (a view of a larger grid, say) when given, and ``drawn(i)``
    is called once the first ``i`` of them are there."""
    batch = logits.shape[0] // 2 if cfg_scale is not None else logits.shape[0]
    if out is None:
        out = torch.empty(batch, num_tokens, dtype=torch.long, device=logits.device)
    for i in range(num_tokens):
        scores = logits.float()
        if cfg_scale is not None:
            cond, uncond = scores.chunk(2)
            scores = uncond + cfg_scale * (cond - uncond)
        token = next_tokens(scores, temperature, top_k, top_p, generator)
        out[:, i:i + 1] = token
        if drawn is not None:
            drawn(i + 1)
        if i + 1 < num_tokens:
            logits = feed(token.repeat(2, 1) if cfg_scale is not None else token)
    return out


def cached_feed(gpt: GPT, cache: KVCache, position: int, compiled: bool) -> Feed:
    """A ``feed`` for :func:`draw_tokens` that appends each token to ``cache`` (from ``position`` on) with the
    one-token step, compiled when asked (see the module docstring)."""
    step = compiled_decode_step(cache.keys[0].device) if compiled else decode_step
    where = torch.tensor([position], device=cache.keys[0].device)

    def feed(token: torch.Tensor) -> torch.Tensor:
        if compiled:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits are used up
        logits = step(gpt, token, where, cache)
        where.add_(1)
        return logits

    return feed


def decode_step(gpt: GPT, token: torch.Tensor, position: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits [B, out_vocab_size] after appending ``token`` [B, 1] at ``position`` [1] (a long tensor) to ``cache``."""
    return gpt.forward_at(token, position, cache)[:, -1]


DecodeStep = Callable[[GPT, torch.Tensor, torch.Tensor, KVCache], torch.Tensor]
_COMPILED_STEPS: dict[str, DecodeStep] = {}


def compiled_decode_step(device: torch.device) -> DecodeStep:
    """:func:`decode_step` under ``torch.compile`` with static shapes: CUDA graphs on CUDA
    (``mode="reduce-overhead"``), inductor's default mode elsewhere. One compiled function per device
    type, so later calls with the same shapes reuse its graphs."""
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    if mode not in _COMPILED_STEPS:
        _COMPILED_STEPS[mode] = torch.compile(decode_step, mode=mode, dynamic=False, fullgraph=True)
    return _COMPILED_STEPS[mode]

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

from collections.abc import Callable
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
                  use_cache: bool = True, cache: KVCache | None = None) -> torch.Tensor:
    """Sample ``num_tokens`` tokens [B, num_tokens] after ``prefix`` [B, P].

    With ``cfg_scale != 1`` the conditional ``prefix`` and ``uncond_prefix`` (same shape) run as
    one doubled batch and the next-token logits are ``uncond + cfg_scale * (cond - uncond)``.
    ``compile`` runs the cached one-token step through ``torch.compile`` (see the module docstring);
    ``use_cache=False`` recomputes the full sequence at every step (slow reference path). ``cache``: a KV
    cache of the (doubled) batch with room for ``P + num_tokens - 1`` positions to decode into, instead of a
    new one (the sliding-window sampler keeps one for all its runs, so a compiled step sees one shape). The model
    is put in eval mode while sampling and restored afterwards.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}.")
    check_filters(top_k, top_p)
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be at least 1, got {num_tokens}.")
    guided = cfg_scale != 1.0
    if guided:
        if uncond_prefix is None or uncond_prefix.shape != prefix.shape:
            raise ValueError("cfg_scale != 1 needs an uncond_prefix of the same shape as prefix.")
        prefix = torch.cat([prefix, uncond_prefix])
    was_training = gpt.training
    gpt.eval()
    try:
        if use_cache and cache is None:
            cache = gpt.new_cache(len(prefix), prefix.shape[1] + num_tokens - 1)
        return _decode(gpt, prefix, num_tokens, temperature, top_k, top_p, cfg_scale if guided else None,
                       generator, cache if use_cache else None, compile)
    finally:
        gpt.train(was_training)


def _decode(gpt: GPT, prefix: torch.Tensor, num_tokens: int, temperature: float, top_k: int | None,
            top_p: float | None, cfg_scale: float | None, generator: torch.Generator | None,
            cache: KVCache | None, compiled: bool) -> torch.Tensor:
    """The sampling loop of :func:`sample_tokens`; ``prefix`` is already doubled when ``cfg_scale`` is set, and
    ``cache`` is None for the recomputing reference."""
    batch, length = prefix.shape
    out = prefix.new_empty(batch // 2 if cfg_scale is not None else batch, num_tokens)
    seq = prefix
    use_cache = cache is not None
    if use_cache:
        if length + num_tokens - 1 > cache.max_len:
            raise ValueError(f"the KV cache holds {cache.max_len} positions; {length + num_tokens - 1} are needed.")
        logits = gpt.forward_at(prefix, torch.arange(length, device=prefix.device), cache, last_only=True)[:, -1]
        position = torch.tensor([length], device=prefix.device)
        step = compiled_decode_step(prefix.device) if compiled else decode_step
    else:
        logits = gpt(prefix)[0][:, -1]
    for i in range(num_tokens):
        scores = logits.float()
        if cfg_scale is not None:
            cond, uncond = scores.chunk(2)
            scores = uncond + cfg_scale * (cond - uncond)
        token = next_tokens(scores, temperature, top_k, top_p, generator)
        out[:, i:i + 1] = token
        if i + 1 == num_tokens:
            break
        if cfg_scale is not None:
            token = token.repeat(2, 1)
        if use_cache:
            if compiled:
                torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits are used up
            logits = step(gpt, token, position, cache)
            position += 1
        else:
            seq = torch.cat([seq, token], dim=1)
            logits = gpt(seq)[0][:, -1]
    return out


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

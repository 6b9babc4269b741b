"""Decoder-only transformer (GPT) with causal SDPA attention and a preallocated KV cache.

Pre-norm blocks (LayerNorm -> causal self-attention -> residual, LayerNorm -> 4x GELU MLP ->
residual), learned or rotary positions, GPT-2 initialisation. The input vocabulary (codes plus
special tokens) and the output vocabulary (what the model predicts) may differ.

Incremental decoding: ``cache = gpt.new_cache(batch_size)`` then ``gpt.forward_with_cache(idx,
cache)`` any number of times; each call appends ``idx.shape[1]`` positions and returns their
logits, which equal those of a full forward over the whole sequence.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from transformer.linear import Linear

Positions = Literal["learned", "rotary"]


class KVCache:
    """Keys and values of every layer for a batch, preallocated up to ``max_len`` positions.

    ``keys`` and ``values`` have shape [n_layer, B, n_head, max_len, head_dim]; ``length`` counts
    the positions already written. Keys are stored after the rotary rotation, if any.
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_len: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``, ``v`` [B, n_head, t, head_dim] after the cached positions of ``layer``.

        Returns the keys and values of all positions so far (cached + new). ``length`` is not
        moved here: the model calls :meth:`advance` once all layers have written.
        """
        end = self.length + k.shape[2]
        self.keys[layer, :, :, self.length:end] = k
        self.values[layer, :, :, self.length:end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, t: int) -> None:
        self.length += t


class Rotary(nn.Module):
    """Rotary position embedding (rotate-half form) for heads of size ``head_dim``."""

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary positions need an even head size, got {head_dim} (n_embd / n_head).")
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosines and sines [length, head_dim / 2] for positions ``start .. start + length - 1``."""
        return self.cos[start:start + length], self.sin[start:start + length]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, n_head, T, head_dim] by the position angles given as ``cos``, ``sin``."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
              dropout_p: float) -> torch.Tensor:
    """Scaled dot-product attention of ``q`` [B, n_head, T, head_dim] over ``k``, ``v`` [B, n_head, S, head_dim].

    ``mask`` (bool [T, S], True = attend) or ``is_causal`` restrict the keys each query sees. On CPU, the
    flash-attention kernel's backward in bf16 is several times slower than in fp32, and both are
    slower than bf16 batched products around a softmax (per layer of the benchmark's GPT, forward and
    backward: 9.6 ms bf16 flash, 3.4 ms fp32 flash, 1.7 ms written out), so where gradients are taken
    in bf16 on CPU the attention is written out: one ``baddbmm`` gives the scaled scores (rounded to
    bf16, as the flash kernel's bf16 path also rounds its probabilities) plus the mask as an additive
    bias, and the CPU softmax reads the bf16 scores and computes in fp32.
    """
    if mask is not None and is_causal:
        raise ValueError("attention takes a mask or is_causal, not both.")
    if not (q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_grad_enabled()):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p)
    B, H, T, D = q.shape
    S = k.shape[-2]
    if is_causal:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    bias = q.new_zeros(()).expand(T, S) if mask is None else q.new_zeros(T, S).masked_fill(~mask, float("-inf"))
    scores = torch.baddbmm(bias.expand(B * H, T, S), q.reshape(B * H, T, D), k.reshape(B * H, S, D).transpose(1, 2),
                           beta=0.0 if mask is None else 1.0, alpha=D ** -0.5)
    probs = F.dropout(scores.softmax(dim=-1), dropout_p) if dropout_p else scores.softmax(dim=-1)
    return torch.bmm(probs, v.reshape(B * H, S, D)).view(B, H, T, D)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = Linear(n_embd, 3 * n_embd)
        self.proj = Linear(n_embd, n_embd)
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        start = 0
        if cache is not None:
            start = cache.length
            k, v = cache.write(layer, k, v)
        mask = None
        if start > 0 and T > 1:
            # New queries see every cached position and the new ones up to themselves.
            mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
        y = attention(q, k, v, mask, start == 0 and T > 1, self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float) -> None:
        super().__init__()
        self.fc = Linear(n_embd, 4 * n_embd)
        self.proj = Linear(4 * n_embd, n_embd)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd, dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only transformer over ``vocab_size`` input tokens predicting ``out_vocab_size`` classes.

    Args:
        vocab_size: input vocabulary (e.g. codes plus start / class tokens).
        block_size: longest sequence the model accepts.
        n_layer, n_head, n_embd: depth, attention heads, width (``n_embd`` divisible by ``n_head``).
        dropout: on embeddings, attention weights and residual branches.
        positions: ``"learned"`` absolute embeddings or ``"rotary"`` rotations of queries and keys.
        out_vocab_size: size of the output head; defaults to ``vocab_size``.
    """

    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int, *,
                 dropout: float, positions: Positions, out_vocab_size: int | None = None) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head}).")
        if positions not in ("learned", "rotary"):
            raise ValueError(f"positions must be 'learned' or 'rotary', got {positions!r}.")
        self.vocab_size = vocab_size
        self.out_vocab_size = out_vocab_size or vocab_size
        self.block_size = block_size
        self.n_layer, self.n_head, self.n_embd = n_layer, n_head, n_embd
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd) if positions == "learned" else None
        self.rotary = Rotary(n_embd // n_head, block_size) if positions == "rotary" else None
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = Linear(n_embd, self.out_vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):  # residual-branch outputs, scaled as in GPT-2
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _run(self, idx: torch.Tensor, start: int, cache: KVCache | None) -> torch.Tensor:
        T = idx.shape[1]
        if start + T > self.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds block_size {self.block_size}.")
        x = self.tok_emb(idx)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(start, start + T, device=idx.device))
        else:
            rope = self.rotary(start, T)
        x = self.drop(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, cache, layer)
        return self.head(self.ln_f(x))

    def forward(self, idx: torch.Tensor,
                targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, T, out_vocab_size] for tokens ``idx`` [B, T], and the mean cross-entropy
        against ``targets`` [B, T] (entries equal to -100 are ignored) when given."""
        logits = self._run(idx, 0, None)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return logits, loss

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for ``batch_size`` sequences of up to ``max_len`` (default block_size) tokens."""
        max_len = max_len or self.block_size
        if max_len > self.block_size:
            raise ValueError(f"cache length {max_len} exceeds block_size {self.block_size}.")
        weight = self.tok_emb.weight
        return KVCache(self.n_layer, batch_size, self.n_head, max_len, self.n_embd // self.n_head,
                       device=weight.device, dtype=weight.dtype)

    def forward_with_cache(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Append ``idx`` [B, t] after the ``cache.length`` cached positions; logits [B, t, out_vocab_size]."""
        if cache.length + idx.shape[1] > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {cache.length} used, "
                             f"{idx.shape[1]} more requested.")
        logits = self._run(idx, cache.length, cache)
        cache.advance(idx.shape[1])
        return logits

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW parameter groups: decay on every matrix (linear weights and embeddings, as in
        GPT-2 / nanoGPT), none on biases and LayerNorm parameters."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]

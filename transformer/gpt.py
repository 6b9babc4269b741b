"""Decoder-only transformer (GPT) with causal SDPA attention and a preallocated KV cache.

Pre-norm blocks (LayerNorm -> causal self-attention -> residual, LayerNorm -> 4x GELU MLP ->
residual), learned or rotary positions, GPT-2 initialisation. The input vocabulary (codes plus
special tokens) and the output vocabulary (what the model predicts) may differ.

Incremental decoding: ``cache = gpt.new_cache(batch_size)`` then ``gpt.forward_with_cache(idx,
cache)`` any number of times; each call appends ``idx.shape[1]`` positions and returns their
logits, which equal those of a full forward over the whole sequence. Both run the same blocks;
with a cache, attention covers the cache's fixed ``max_len`` positions, masked beyond each query's own.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Positions = Literal["learned", "rotary"]


class KVCache:
    """Keys and values of every layer for a batch, preallocated for ``max_len`` positions.

    ``keys[layer]`` and ``values[layer]`` are tensors of shape [B, n_head, max_len, head_dim] (keys after the
    rotary rotation, if any), one pair per layer: a write into one layer's tensor then stays a write in
    place under ``torch.compile``, where slices of one tensor for all layers made the compiled step copy the
    whole cache every token. ``length`` counts the positions :meth:`GPT.forward_with_cache` has written.
    The shapes never change, so a compiled decoding step runs on the same tensors every time.
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_len: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        shape = (batch_size, n_head, max_len, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_len = max_len
        self.length = 0

    def write(self, layer: int, positions: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``, ``v`` [B, n_head, t, head_dim] at ``positions`` [t] of ``layer``; all keys and values
        of the layer (every ``max_len`` position: the caller masks those not yet written)."""
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, positions] = k
        values[:, :, positions] = v
        return keys, values


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

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosines and sines [T, head_dim / 2] for ``positions`` [T]."""
        return self.cos[positions], self.sin[positions]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, n_head, T, head_dim] by the position angles given as ``cos``, ``sin``."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                positions: torch.Tensor, cache: KVCache | None, layer: int, prefill: bool) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.qkv(x).split(C, dim=2))
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        mask = None
        if cache is not None:
            keys, values = cache.write(layer, positions, k, v)
            if not prefill:  # each query sees the cache up to its own position; a fixed-size mask keeps shapes static
                k, v = keys, values
                mask = torch.arange(cache.max_len, device=x.device) <= positions[:, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.proj = nn.Linear(4 * n_embd, n_embd)
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
                positions: torch.Tensor, cache: KVCache | None, layer: int, prefill: bool) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, positions, cache, layer, prefill)
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
        self.head = nn.Linear(n_embd, self.out_vocab_size, bias=False)
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

    def _run(self, idx: torch.Tensor, positions: torch.Tensor, cache: KVCache | None,
             last_only: bool = False, prefill: bool = False) -> torch.Tensor:
        x = self.tok_emb(idx)
        rope = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        else:
            rope = self.rotary(positions)
        x = self.drop(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, positions, cache, layer, prefill)
        if last_only:
            x = x[:, -1:]
        return self.head(self.ln_f(x))

    def forward(self, idx: torch.Tensor,
                targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, T, out_vocab_size] for tokens ``idx`` [B, T], and the mean cross-entropy
        against ``targets`` [B, T] (entries equal to -100 are ignored) when given."""
        if idx.shape[1] > self.block_size:
            raise ValueError(f"sequence of {idx.shape[1]} tokens exceeds block_size {self.block_size}.")
        logits = self._run(idx, torch.arange(idx.shape[1], device=idx.device), None)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return logits, loss

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KV cache for ``batch_size`` sequences of up to ``max_len`` (default block_size) tokens, in the
        dtype the keys will have: autocast's where it is on (bf16 sampling), else the weights'."""
        max_len = max_len or self.block_size
        if max_len > self.block_size:
            raise ValueError(f"cache length {max_len} exceeds block_size {self.block_size}.")
        weight = self.tok_emb.weight
        device_type = weight.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        return KVCache(self.n_layer, batch_size, self.n_head, max_len, self.n_embd // self.n_head,
                       device=weight.device, dtype=dtype)

    def forward_with_cache(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Append ``idx`` [B, t] after the ``cache.length`` cached positions; logits [B, t, out_vocab_size]."""
        if cache.length + idx.shape[1] > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {cache.length} used, "
                             f"{idx.shape[1]} more requested.")
        positions = torch.arange(cache.length, cache.length + idx.shape[1], device=idx.device)
        logits = self.forward_at(idx, positions, cache, prefill=cache.length == 0)
        cache.length += idx.shape[1]
        return logits

    def forward_at(self, idx: torch.Tensor, positions: torch.Tensor, cache: KVCache, last_only: bool = False,
                   prefill: bool = False) -> torch.Tensor:
        """Logits [B, t, out_vocab_size] of tokens ``idx`` [B, t] at ``positions`` [t] (a long tensor, every
        earlier position already in ``cache``), whose keys and values are written into ``cache``; with
        ``last_only`` the logits of the last position only [B, 1, out_vocab_size] (the output head skips the rest).
        ``prefill``: the tokens are positions ``0 .. t-1``, so attention runs over their own keys (causal) instead of
        the whole cache under a mask: the same values, less work.

        Nothing here depends on Python values that change from token to token (``cache.length`` is
        neither read nor moved), so a ``torch.compile`` of this call decodes every token with one graph.
        """
        return self._run(idx, positions, cache, last_only, prefill)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW parameter groups: decay on every matrix (linear weights and embeddings, as in
        GPT-2 / nanoGPT), none on biases and LayerNorm parameters."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]

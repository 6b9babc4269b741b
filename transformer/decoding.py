"""One-token decoding for sampling: the GPT's forward for one new position per sequence, written out.

``GPT.forward_with_cache`` appends any number of positions through the modules. Sampling appends one
position per step for a small batch, where the arithmetic is small (a batch of 16 through the
benchmark's 8 x 256 GPT is 16-row matrix products) and the rest of the work is not: module calls,
head reshapes, attention masks, and matrices multiplied the way ``nn.Linear`` stores them.
:class:`TokenDecoder` runs the same computation as plain tensor operations on the GPT's own
parameters, with each matrix laid out for a few rows of input (see :class:`RowLinear`). It gives the
logits of the module path (tests check both against the full forward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from transformer.gpt import GPT, Block, KVCache, apply_rotary


class RowLinear:
    """``nn.Linear`` for a few rows at a time: ``x @ weight_t + bias``.

    On CPU the weight is copied input-major ([in, out], contiguous): MKL multiplies 16 rows by that
    layout about 1.3x faster than by ``nn.Linear``'s [out, in] one. Elsewhere it is a transposed view
    of the module's weight (cuBLAS takes either layout at full speed), so nothing is copied.
    """

    def __init__(self, linear: nn.Linear) -> None:
        weight = linear.weight.detach().t()
        self.weight_t = weight.contiguous() if weight.device.type == "cpu" else weight
        self.bias = None if linear.bias is None else linear.bias.detach()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return x @ self.weight_t
        return torch.addmm(self.bias, x, self.weight_t)


class DecoderLayer:
    """One transformer block for one new position of each sequence: x [B, n_embd] -> [B, n_embd]."""

    def __init__(self, block: Block, n_head: int) -> None:
        self.ln_1, self.ln_2 = block.ln_1, block.ln_2
        self.qkv, self.proj = RowLinear(block.attn.qkv), RowLinear(block.attn.proj)
        self.fc, self.fc_proj = RowLinear(block.mlp.fc), RowLinear(block.mlp.proj)
        self.n_head = n_head

    def __call__(self, x: torch.Tensor, cache: KVCache, layer: int,
                 rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        B, C = x.shape
        h = F.layer_norm(x, (C,), self.ln_1.weight, self.ln_1.bias, self.ln_1.eps)
        q, k, v = self.qkv(h).view(B, 3, self.n_head, 1, C // self.n_head).unbind(1)  # each [B, n_head, 1, d]
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        keys, values = cache.write(layer, k, v)
        y = F.scaled_dot_product_attention(q, keys, values).view(B, C)
        x = self.proj(y).add_(x)
        h = F.layer_norm(x, (C,), self.ln_2.weight, self.ln_2.bias, self.ln_2.eps)
        return self.fc_proj(F.gelu(self.fc(h))).add_(x)


class TokenDecoder:
    """Incremental decoding of ``batch_size`` sequences of up to ``max_len`` positions.

    ``prefill(prefix)`` runs the prefix through the GPT's module path and returns the logits of its
    last position; each ``step(tokens)`` then appends one token per sequence and returns the logits
    [B, out_vocab_size] of the next. Holds references to the GPT's parameters (plus, on CPU, an
    input-major copy of its matrices), so build it after the weights are final and in eval mode.
    """

    def __init__(self, gpt: GPT, batch_size: int, max_len: int) -> None:
        self.gpt = gpt
        self.cache = gpt.new_cache(batch_size, max_len)
        self.layers = [DecoderLayer(block, gpt.n_head) for block in gpt.blocks]
        self.head = RowLinear(gpt.head)

    @torch.no_grad()
    def prefill(self, prefix: torch.Tensor) -> torch.Tensor:
        """Logits [B, out_vocab_size] after ``prefix`` [B, P], which fills the first P cache positions."""
        return self.gpt.forward_with_cache(prefix, self.cache)[:, -1]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``tokens`` [B, 1]; logits [B, out_vocab_size] of the position after them."""
        cache, gpt = self.cache, self.gpt
        position = cache.length
        if position >= cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions, all used.")
        x = gpt.tok_emb.weight[tokens[:, 0]]
        rope = None
        if gpt.pos_emb is not None:
            x = x + gpt.pos_emb.weight[position]
        else:
            rope = gpt.rotary(position, 1)
        for layer, decoder_layer in enumerate(self.layers):
            x = decoder_layer(x, cache, layer, rope)
        cache.advance(1)
        ln_f = gpt.ln_f
        return self.head(F.layer_norm(x, (x.shape[1],), ln_f.weight, ln_f.bias, ln_f.eps))

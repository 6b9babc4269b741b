"""One-token decoding for sampling: the GPT's forward for one new position per sequence, written out.

``GPT.forward_with_cache`` appends any number of positions through the modules. Sampling appends one
position per step for a small batch, where the arithmetic is small (a batch of 16 through the
benchmark's 8 x 256 GPT is 16-row matrix products) and the rest of the work is not: module calls,
head reshapes, attention masks, separate passes for GELU and residual adds. :class:`TokenDecoder`
runs the same computation as plain tensor operations on the GPT's own parameters, through
:class:`RowLinear` products that also apply the GELU or add the residual. It gives the logits of
the module path (tests check both against the full forward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from transformer.gpt import GPT, Block, KVCache, apply_rotary
from transformer.linear import uses_onednn


class RowLinear:
    """``nn.Linear`` for a fixed number of rows at a time, optionally followed by GELU, then a residual add.

    Where :func:`transformer.linear.uses_onednn` holds (fp32 on CPU), the weight is reordered once into
    oneDNN's blocked layout for ``rows``-row products (other row counts work, but are reordered again
    on every call), and GELU and the residual add run inside the product; this took the four products
    of a layer of the benchmark's GPT from 330 us to 145 us on an AMD EPYC. Elsewhere it computes
    ``F.linear`` on the module's weight.
    """

    def __init__(self, linear: nn.Linear, rows: int) -> None:
        self.weight = linear.weight.detach()
        self.bias = None if linear.bias is None else linear.bias.detach()
        probe = self.weight.new_empty(rows, self.weight.shape[1])
        self.packed = (torch.ops.mkldnn._reorder_linear_weight(self.weight, rows)
                       if uses_onednn(probe, self.weight, self.bias) else None)

    def __call__(self, x: torch.Tensor, *, gelu: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.packed is None or not uses_onednn(x, self.weight, self.bias):
            y = F.linear(x, self.weight, self.bias)
            y = F.gelu(y) if gelu else y
            return y if residual is None else y + residual
        if gelu:
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "gelu", [], "none")
            return y if residual is None else y.add_(residual)
        if residual is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, self.packed, self.bias, "add")
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class DecoderLayer:
    """One transformer block for one new position of each sequence: x [B, n_embd] -> [B, n_embd]."""

    def __init__(self, block: Block, n_head: int, rows: int) -> None:
        self.ln_1, self.ln_2 = block.ln_1, block.ln_2
        self.qkv, self.proj = RowLinear(block.attn.qkv, rows), RowLinear(block.attn.proj, rows)
        self.fc, self.fc_proj = RowLinear(block.mlp.fc, rows), RowLinear(block.mlp.proj, rows)
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
        x = self.proj(y, residual=x)
        h = F.layer_norm(x, (C,), self.ln_2.weight, self.ln_2.bias, self.ln_2.eps)
        return self.fc_proj(self.fc(h, gelu=True), residual=x)


class TokenDecoder:
    """Incremental decoding of ``batch_size`` sequences of up to ``max_len`` positions.

    ``prefill(prefix)`` runs the prefix through the GPT's module path and returns the logits of its
    last position; each ``step(tokens)`` then appends one token per sequence and returns the logits
    [B, out_vocab_size] of the next. Holds the GPT's parameters (on CPU, reordered copies of its
    matrices), so build it after the weights are final and in eval mode.
    """

    def __init__(self, gpt: GPT, batch_size: int, max_len: int) -> None:
        self.gpt = gpt
        self.cache = gpt.new_cache(batch_size, max_len)
        self.layers = [DecoderLayer(block, gpt.n_head, batch_size) for block in gpt.blocks]
        self.head = RowLinear(gpt.head, batch_size)

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

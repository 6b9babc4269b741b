"""Stage 2: a GPT prior over VQGAN code indices, and sampling from it."""

from transformer.gpt import GPT, KVCache
from transformer.prior import VQGANPrior
from transformer.sampling import filter_logits, sample_tokens

__all__ = ["GPT", "KVCache", "VQGANPrior", "filter_logits", "sample_tokens"]

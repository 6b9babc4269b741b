"""Stage 2: a GPT prior over VQGAN code indices, and sampling from it."""

from transformer.gpt import GPT, KVCache
from transformer.prior import PriorConfig, VQGANPrior
from transformer.sampling import SamplingConfig, filter_logits, sample_tokens

__all__ = ["GPT", "KVCache", "PriorConfig", "SamplingConfig", "VQGANPrior", "filter_logits", "sample_tokens"]

"""Sampling: logit filters, top-k / top-p support, guidance, cache vs recompute, determinism."""

import shutil

import pytest
import torch

from transformer import GPT, filter_logits, sample_tokens

VOCAB, BLOCK = 12, 24


def tiny_gpt(positions: str = "learned") -> GPT:
    torch.manual_seed(0)
    return GPT(VOCAB, BLOCK, n_layer=2, n_head=2, n_embd=32, dropout=0.0, positions=positions)


def constant_gpt(logits: torch.Tensor) -> GPT:
    """A GPT whose next-token logits are ``logits`` whatever the input."""
    gpt = tiny_gpt()
    with torch.no_grad():
        gpt.ln_f.weight.zero_()
        gpt.ln_f.bias.zero_()
        gpt.ln_f.bias[0] = 1.0
        gpt.head.weight.zero_()
        gpt.head.weight[:, 0] = logits
    return gpt


def draws(gpt: GPT, **kwargs) -> torch.Tensor:
    prefix = torch.zeros(16, 1, dtype=torch.long)
    return sample_tokens(gpt, prefix, BLOCK - 1, generator=torch.Generator().manual_seed(0), **kwargs)


def test_filter_logits_top_k():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0], [0.0, 0.0, 9.0, 1.0, 8.0]])
    kept = filter_logits(logits, top_k=2).isfinite()
    assert kept.tolist() == [[False, True, False, True, False], [False, False, True, False, True]]
    assert filter_logits(logits, top_k=10).isfinite().all()
    with pytest.raises(ValueError, match="top_k"):
        filter_logits(logits, top_k=0)


def test_filter_logits_top_p():
    probs = torch.tensor([0.05, 0.5, 0.1, 0.3, 0.05])
    logits = probs.log()
    assert filter_logits(logits, top_p=0.75).isfinite().tolist() == [False, True, False, True, False]
    assert filter_logits(logits, top_p=0.79).isfinite().tolist() == [False, True, False, True, False]
    assert filter_logits(logits, top_p=0.85).isfinite().sum() == 3
    assert filter_logits(logits, top_p=1e-6).isfinite().tolist() == [False, True, False, False, False]
    assert filter_logits(logits, top_p=1.0).isfinite().all()
    assert filter_logits(logits, top_k=3, top_p=0.99).isfinite().tolist() == [False, True, True, True, False]
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(logits, top_p=0.0)


def test_top_k_emits_only_top_k_tokens():
    logits = torch.linspace(0.0, 1.0, VOCAB)
    tokens = draws(constant_gpt(logits), top_k=3)
    assert set(tokens.unique().tolist()) == {VOCAB - 1, VOCAB - 2, VOCAB - 3}
    assert len(draws(constant_gpt(logits)).unique()) == VOCAB


def test_top_p_emits_only_the_nucleus():
    probs = torch.full((VOCAB,), 0.02)
    probs[3], probs[7], probs[9] = 0.5, 0.25, 0.05
    probs /= probs.sum()
    tokens = draws(constant_gpt(probs.log()), top_p=0.7)
    assert set(tokens.unique().tolist()) == {3, 7}


def test_temperature_sharpens():
    logits = torch.linspace(0.0, 2.0, VOCAB)
    gpt = constant_gpt(logits)
    cold = (draws(gpt, temperature=0.05) == VOCAB - 1).float().mean()
    warm = (draws(gpt, temperature=1.0) == VOCAB - 1).float().mean()
    assert cold > 0.9 > warm
    with pytest.raises(ValueError, match="temperature"):
        draws(gpt, temperature=0.0)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_cache_and_recompute_give_the_same_tokens(positions):
    gpt = tiny_gpt(positions)
    prefix = torch.randint(VOCAB, (4, 3))
    fast = sample_tokens(gpt, prefix, BLOCK - 3, generator=torch.Generator().manual_seed(1))
    slow = sample_tokens(gpt, prefix, BLOCK - 3, generator=torch.Generator().manual_seed(1), use_cache=False)
    assert fast.shape == (4, BLOCK - 3) and fast.dtype == torch.long
    assert torch.equal(fast, slow)


def test_seed_determinism():
    gpt = tiny_gpt()
    prefix = torch.zeros(4, 1, dtype=torch.long)
    a = sample_tokens(gpt, prefix, 16, top_k=5, generator=torch.Generator().manual_seed(3))
    b = sample_tokens(gpt, prefix, 16, top_k=5, generator=torch.Generator().manual_seed(3))
    c = sample_tokens(gpt, prefix, 16, top_k=5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_cfg_scale_one_equals_conditional_sampling():
    gpt = tiny_gpt()
    cond, uncond = torch.full((4, 1), 1), torch.full((4, 1), 2)
    plain = sample_tokens(gpt, cond, 16, generator=torch.Generator().manual_seed(5))
    scale_one = sample_tokens(gpt, cond, 16, cfg_scale=1.0, uncond_prefix=uncond,
                              generator=torch.Generator().manual_seed(5))
    assert torch.equal(plain, scale_one)


@pytest.mark.parametrize("use_cache", [True, False])
def test_guidance_runs_a_doubled_batch(use_cache):
    gpt = tiny_gpt()
    cond = torch.full((4, 1), 1)
    plain = sample_tokens(gpt, cond, 16, generator=torch.Generator().manual_seed(5), use_cache=use_cache)
    # With the same prefix on both halves guidance changes nothing, at any scale.
    same = sample_tokens(gpt, cond, 16, cfg_scale=3.0, uncond_prefix=cond.clone(),
                         generator=torch.Generator().manual_seed(5), use_cache=use_cache)
    assert torch.equal(plain, same)
    guided = sample_tokens(gpt, cond, 16, cfg_scale=3.0, uncond_prefix=torch.full((4, 1), 2),
                           generator=torch.Generator().manual_seed(5), use_cache=use_cache)
    assert guided.shape == (4, 16) and not torch.equal(plain, guided)


def test_guidance_pushes_away_from_the_unconditional_prediction():
    gpt = tiny_gpt()
    cond, uncond = torch.full((256, 1), 1), torch.full((256, 1), 2)
    with torch.no_grad():
        gpt.head.weight.mul_(50.0)
        cond_logits, uncond_logits = gpt(cond[:1])[0][0, -1], gpt(uncond[:1])[0][0, -1]
    favoured = int((cond_logits - uncond_logits).argmax())
    plain = sample_tokens(gpt, cond, 1, generator=torch.Generator().manual_seed(0))
    guided = sample_tokens(gpt, cond, 1, cfg_scale=20.0, uncond_prefix=uncond,
                           generator=torch.Generator().manual_seed(0))
    assert (guided == favoured).float().mean() > 0.9 > (plain == favoured).float().mean()


def test_argument_errors_and_mode_restored():
    gpt = tiny_gpt().train()
    prefix = torch.zeros(2, 1, dtype=torch.long)
    with pytest.raises(ValueError, match="uncond_prefix"):
        sample_tokens(gpt, prefix, 4, cfg_scale=2.0)
    with pytest.raises(ValueError, match="num_tokens"):
        sample_tokens(gpt, prefix, 0)
    with pytest.raises(ValueError, match="block_size"):
        sample_tokens(gpt, prefix, BLOCK + 1, use_cache=False)
    assert gpt.training


def test_compiled_sampling_gives_the_eager_tokens():
    """``compile=True`` runs the same forward under torch.compile (inductor on the CPU): same tokens at fp32."""
    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("torch.compile (inductor) needs a C++ compiler for CPU code")
    gpt = GPT(VOCAB, 8, n_layer=1, n_head=2, n_embd=16, dropout=0.0, positions="rotary")
    prefix = torch.randint(VOCAB, (2, 2), generator=torch.Generator().manual_seed(0))
    eager, compiled = (sample_tokens(gpt, prefix, 6, top_k=8, compile=compile,
                                     generator=torch.Generator().manual_seed(1)) for compile in (False, True))
    assert torch.equal(compiled, eager)

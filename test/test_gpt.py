"""GPT: shapes, causality, KV-cache equivalence, initialisation, parameter groups, overfitting."""

import math

import pytest
import torch

from transformer import GPT

VOCAB, BLOCK = 20, 16


def tiny_gpt(positions: str = "learned", **kwargs) -> GPT:
    torch.manual_seed(0)
    return GPT(VOCAB, BLOCK, n_layer=2, n_head=2, n_embd=32, positions=positions, **{"dropout": 0.0, **kwargs}).eval()


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_forward_shapes_and_loss(positions):
    gpt = tiny_gpt(positions, out_vocab_size=12)
    idx = torch.randint(VOCAB, (3, BLOCK))
    targets = torch.randint(12, (3, BLOCK))
    logits, loss = gpt(idx, targets)
    assert logits.shape == (3, BLOCK, 12)
    assert loss.ndim == 0 and abs(loss.item() - math.log(12)) < 0.5
    assert gpt(idx)[1] is None


def test_loss_ignores_minus_100():
    gpt = tiny_gpt()
    idx = torch.randint(VOCAB, (2, 8))
    targets = torch.randint(VOCAB, (2, 8))
    masked = targets.clone()
    masked[:, 4:] = -100
    logits, loss = gpt(idx, masked)
    expected = torch.nn.functional.cross_entropy(logits[:, :4].flatten(0, 1), targets[:, :4].flatten())
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_causality(positions):
    gpt = tiny_gpt(positions)
    idx = torch.randint(VOCAB, (2, 12))
    base = gpt(idx)[0]
    for t in (0, 5, 11):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % VOCAB
        out = gpt(changed)[0]
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=0, rtol=0)
        assert not torch.allclose(out[:, t], base[:, t])


@pytest.mark.parametrize("positions", ["learned", "rotary"])
@pytest.mark.parametrize("chunks", [[1] * BLOCK, [5] + [1] * 11, [3, 4, 1, 6, 2], [BLOCK]])
def test_kv_cache_matches_full_forward(positions, chunks):
    gpt = tiny_gpt(positions)
    idx = torch.randint(VOCAB, (3, BLOCK))
    full = gpt(idx)[0]
    cache = gpt.new_cache(3)
    pieces, start = [], 0
    for size in chunks:
        pieces.append(gpt.forward_with_cache(idx[:, start:start + size], cache))
        start += size
    assert cache.length == BLOCK
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)



@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_kv_cache_under_bf16_autocast_matches_full_forward(positions):
    gpt = tiny_gpt(positions)
    idx = torch.randint(VOCAB, (2, BLOCK))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = gpt(idx)[0]
        cache = gpt.new_cache(2)
        pieces = [gpt.forward_with_cache(idx[:, :5], cache)]
        pieces += [gpt.forward_with_cache(idx[:, t:t + 1], cache) for t in range(5, BLOCK)]
    assert cache.keys[0].dtype == torch.bfloat16
    torch.testing.assert_close(torch.cat(pieces, dim=1).float(), full.float(), atol=0.05, rtol=0)

def test_kv_cache_limits():
    gpt = tiny_gpt()
    cache = gpt.new_cache(2, max_len=4)
    assert len(cache.keys) == len(cache.values) == 2
    assert all(t.shape == (2, 2, 4, 16) for t in cache.keys + cache.values)
    gpt.forward_with_cache(torch.zeros(2, 3, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="KV cache holds 4"):
        gpt.forward_with_cache(torch.zeros(2, 2, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="exceeds block_size"):
        gpt.new_cache(1, max_len=BLOCK + 1)
    with pytest.raises(ValueError, match="exceeds block_size"):
        gpt(torch.zeros(1, BLOCK + 1, dtype=torch.long))


def test_bad_arguments():
    with pytest.raises(ValueError, match="divisible"):
        GPT(VOCAB, BLOCK, n_layer=1, n_head=3, n_embd=32, dropout=0.0, positions="learned")
    with pytest.raises(ValueError, match="positions"):
        GPT(VOCAB, BLOCK, n_layer=1, n_head=2, n_embd=32, dropout=0.0, positions="sinusoidal")
    with pytest.raises(ValueError, match="even head size"):
        GPT(VOCAB, BLOCK, n_layer=1, n_head=2, n_embd=6, dropout=0.0, positions="rotary")


def test_gpt2_init():
    torch.manual_seed(0)
    gpt = GPT(VOCAB, BLOCK, n_layer=4, n_head=2, n_embd=64, dropout=0.0, positions="learned")
    assert gpt.pos_emb is not None and gpt.rotary is None
    assert abs(gpt.blocks[0].mlp.fc.weight.std().item() - 0.02) < 0.003
    assert abs(gpt.blocks[0].mlp.proj.weight.std().item() - 0.02 / math.sqrt(8)) < 0.001
    assert abs(gpt.blocks[0].attn.proj.weight.std().item() - 0.02 / math.sqrt(8)) < 0.001
    linears = [m for m in gpt.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None]
    assert linears and all(torch.count_nonzero(m.bias) == 0 for m in linears)


def test_param_groups_decay_only_matrices():
    gpt = tiny_gpt()
    decay, no_decay = gpt.param_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(gpt.parameters()))
    assert any(p is gpt.tok_emb.weight for p in decay["params"])


def test_dropout_is_active_only_in_training():
    gpt = tiny_gpt(dropout=0.5)
    idx = torch.randint(VOCAB, (2, 8))
    torch.testing.assert_close(gpt(idx)[0], gpt(idx)[0])
    gpt.train()
    assert not torch.allclose(gpt(idx)[0], gpt(idx)[0])


def test_overfits_a_few_sequences():
    gpt = tiny_gpt("rotary").train()
    seqs = torch.stack([torch.randperm(VOCAB)[:BLOCK + 1] for _ in range(4)])
    seqs[:, 0] = torch.arange(4)  # distinct first tokens make every next token predictable
    opt = torch.optim.AdamW(gpt.param_groups(0.0), lr=1e-2)
    for _ in range(80):
        loss = gpt(seqs[:, :-1], seqs[:, 1:])[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


@pytest.mark.parametrize("prefill", [False, True])
@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_forward_at_positions_gives_the_full_forward_logits(positions, prefill):
    """The call compiled sampling makes: one token at a position given as a tensor, the cache untouched
    otherwise (``length`` stays where it is); the first tokens fill the cache with or without ``prefill``."""
    gpt = tiny_gpt(positions, out_vocab_size=12)
    idx = torch.randint(VOCAB, (3, BLOCK))
    full = gpt(idx)[0]
    cache = gpt.new_cache(3)
    logits = [gpt.forward_at(idx[:, :4], torch.arange(4), cache, prefill=prefill)]
    last = gpt.forward_at(idx[:, :4], torch.arange(4), gpt.new_cache(3), last_only=True, prefill=prefill)
    torch.testing.assert_close(last, full[:, 3:4], atol=1e-5, rtol=0)
    position = torch.tensor([4])
    for t in range(4, BLOCK):
        logits.append(gpt.forward_at(idx[:, t:t + 1], position, cache))
        position += 1
    assert cache.length == 0
    torch.testing.assert_close(torch.cat(logits, dim=1), full, atol=1e-5, rtol=0)

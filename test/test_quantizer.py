"""Tests of the vector quantiser: lookup, gradients, loss weighting, EMA, dead codes, usage statistics."""

from __future__ import annotations

import io
import math
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vqgan.quantizer import QuantizerConfig, VectorQuantizer, usage_and_perplexity


def make_quantizer(codebook_size: int, embed_dim: int, **options) -> VectorQuantizer:
    return VectorQuantizer(QuantizerConfig(codebook_size=codebook_size, embed_dim=embed_dim, **options))


def usage(quantizer: VectorQuantizer) -> float:
    return float(quantizer.window_statistics()[0])


def perplexity(quantizer: VectorQuantizer) -> float:
    return float(quantizer.window_statistics()[1])


def train_step(quantizer: VectorQuantizer, *batches: torch.Tensor):
    """Training forwards on ``batches`` (micro-batches of one optimizer step), then the end of the step."""
    outputs = [quantizer(z) for z in batches]
    quantizer.end_step()
    return outputs[-1]


def latents(*vectors: list[float]) -> torch.Tensor:
    """Latents [1, D, 1, N] whose N spatial positions hold the given D-dim vectors."""
    return torch.tensor(vectors, dtype=torch.float32).t().reshape(1, len(vectors[0]), 1, len(vectors))


def set_codes(quantizer: VectorQuantizer, codes: list[list[float]]) -> None:
    with torch.no_grad():
        quantizer.codebook.copy_(torch.tensor(codes))
        if quantizer.ema:
            quantizer.ema_embed_sum.copy_(quantizer.codebook)


def test_nearest_code_and_exact_straight_through_value() -> None:
    torch.manual_seed(0)
    quantizer = make_quantizer(16, 4)
    z = torch.randn(2, 4, 3, 5)
    out = quantizer(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    expected = torch.cdist(flat, quantizer.codebook.detach()).argmin(1).view(2, 3, 5)
    assert out.indices.dtype == torch.long and out.indices.shape == (2, 3, 5)
    assert torch.equal(out.indices, expected)
    assert torch.equal(out.z_q, quantizer.codebook.detach()[out.indices].permute(0, 3, 1, 2))
    assert torch.equal(quantizer.embed_indices(out.indices), out.z_q)


def test_straight_through_gradient_is_identity() -> None:
    torch.manual_seed(0)
    quantizer = make_quantizer(8, 3)
    z = torch.randn(1, 3, 2, 2, requires_grad=True)
    upstream = torch.randn(1, 3, 2, 2)
    (quantizer(z).z_q * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)
    assert quantizer.codebook.grad is None


def test_beta_weighs_the_encoder_term() -> None:
    beta = 0.3
    quantizer = make_quantizer(2, 2, beta=beta)
    set_codes(quantizer, [[0.0, 0.0], [4.0, 4.0]])
    z = latents([1.0, 2.0]).requires_grad_(True)
    out = quantizer(z)
    assert out.indices.flatten().tolist() == [0]
    out.loss.backward()
    diff = torch.tensor([1.0, 2.0])  # z - code, with N = 2 elements in the mean
    assert out.loss.item() == pytest.approx((1 + beta) * diff.pow(2).mean().item())
    assert torch.allclose(z.grad.flatten(), beta * 2 * diff / 2)
    assert torch.allclose(quantizer.codebook.grad[0], -2 * diff / 2)
    assert torch.allclose(quantizer.codebook.grad[1], torch.zeros(2))
    assert torch.allclose(z.grad.flatten(), -beta * quantizer.codebook.grad[0])


def test_l2_norm_picks_code_by_angle_not_distance() -> None:
    codes = [[10.0, 0.0], [0.0, 1.0]]
    z = latents([3.0, 0.5])
    plain = make_quantizer(2, 2)
    cosine = make_quantizer(2, 2, l2_norm=True)
    set_codes(plain, codes)
    set_codes(cosine, codes)
    assert plain(z).indices.item() == 1
    out = cosine(z)
    assert out.indices.item() == 0
    assert torch.allclose(out.z_q.flatten(), torch.tensor([1.0, 0.0]))


def test_low_dimensional_lookup_projects_down_and_up() -> None:
    torch.manual_seed(0)
    quantizer = make_quantizer(3, 4, codebook_dim=2)
    assert quantizer.codebook.shape == (3, 2)
    with torch.no_grad():
        quantizer.project_in.weight.zero_()
        quantizer.project_in.bias.zero_()
        quantizer.project_in.weight[0, 2, 0, 0] = 1.0
        quantizer.project_in.weight[1, 3, 0, 0] = 1.0
    set_codes(quantizer, [[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    z = latents([5.0, 5.0, 0.0, 4.0], [0.0, 0.0, 4.0, 1.0])
    out = quantizer(z)
    assert out.indices.flatten().tolist() == [2, 1]
    expected = quantizer.project_out(torch.tensor([[0.0, 5.0], [5.0, 0.0]]).t().reshape(1, 2, 1, 2))
    assert out.z_q.shape == (1, 4, 1, 2)
    assert torch.allclose(out.z_q, expected)
    assert torch.allclose(quantizer.embed_indices(out.indices), expected)


def test_ema_update_matches_hand_computation() -> None:
    quantizer = make_quantizer(2, 1, ema=True, ema_decay=0.5, ema_eps=0.1, beta=1.0)
    assert not any(p is quantizer.codebook for p in quantizer.parameters())
    set_codes(quantizer, [[0.0], [10.0]])
    z = latents([1.0], [2.0], [9.0])
    quantizer.eval()
    quantizer(z)
    assert quantizer.codebook.flatten().tolist() == [0.0, 10.0]
    quantizer.train()
    out = quantizer(z)
    assert out.indices.flatten().tolist() == [0, 0, 1]
    # Commitment term only: mean of (1-0)^2, (2-0)^2, (9-10)^2.
    assert out.loss.item() == pytest.approx(2.0)
    # sizes 0.5*[1,1] + 0.5*[2,1] = [1.5, 1]; sums 0.5*[0,10] + 0.5*[3,9] = [1.5, 9.5]
    assert quantizer.ema_cluster_size.tolist() == pytest.approx([1.5, 1.0])
    assert quantizer.ema_embed_sum.flatten().tolist() == pytest.approx([1.5, 9.5])
    # smoothed sizes (n_k + 0.1) / (2.5 + 0.2) * 2.5
    assert quantizer.codebook.flatten().tolist() == pytest.approx([1.5 * 2.7 / (1.6 * 2.5), 9.5 * 2.7 / (1.1 * 2.5)])


@pytest.mark.parametrize("ema", [False, True])
def test_dead_codes_are_reseeded_from_encoder_outputs(ema: bool) -> None:
    torch.manual_seed(0)
    quantizer = make_quantizer(8, 2, ema=ema, dead_code_steps=2)
    set_codes(quantizer, [[0.0, 0.0]] + [[100.0, 100.0]] * 7)
    z = torch.randn(2, 2, 4, 4)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 2)
    assert train_step(quantizer, z).indices.unique().tolist() == [0]
    assert quantizer.steps_since_used.tolist() == [0] + [1] * 7
    assert torch.allclose(quantizer.codebook[1:], torch.full((7, 2), 100.0), atol=1e-3)
    assert train_step(quantizer, z).indices.unique().tolist() == [0]
    revived = quantizer.codebook[1:].detach()
    assert all((flat == code).all(1).any() for code in revived)
    assert quantizer.steps_since_used.tolist() == [0] * 8
    if ema:
        assert quantizer.ema_cluster_size[1:].tolist() == [1.0] * 7
        assert torch.equal(quantizer.ema_embed_sum[1:], revived)
    assert len(quantizer(z).indices.unique()) > 1


def test_dead_code_restart_keeps_gradients_usable() -> None:
    torch.manual_seed(0)
    quantizer = make_quantizer(8, 2, l2_norm=True, dead_code_steps=1)
    for _ in range(2):
        z = torch.randn(1, 2, 4, 4, requires_grad=True)
        out = quantizer(z)
        (out.loss + out.z_q.sum()).backward()
        quantizer.end_step()
        assert torch.isfinite(quantizer.codebook.grad).all() and torch.isfinite(z.grad).all()


def test_usage_and_perplexity_of_known_histograms() -> None:
    assert usage_and_perplexity(torch.tensor([5, 5, 5, 5, 0, 0, 0, 0])) == pytest.approx((0.5, 4.0))
    assert usage_and_perplexity(torch.tensor([7, 0, 0, 0])) == pytest.approx((0.25, 1.0))
    assert usage_and_perplexity(torch.tensor([0, 0])) == (0.0, 0.0)
    probs = torch.tensor([0.75, 0.25])
    assert usage_and_perplexity(torch.tensor([3, 1]))[1] == pytest.approx(math.exp(-(probs * probs.log()).sum().item()))


def one_hot_quantizer(window: int) -> VectorQuantizer:
    quantizer = make_quantizer(4, 4, usage_window=window)
    set_codes(quantizer, (10 * torch.eye(4)).tolist())
    return quantizer


def hits(*codes: int) -> torch.Tensor:
    return latents(*[(10 * torch.eye(4)[c]).tolist() for c in codes])


def test_usage_statistics_cover_a_rolling_window_of_training_steps() -> None:
    quantizer = one_hot_quantizer(3)
    assert usage(quantizer) == 0.0
    train_step(quantizer, hits(0, 0))
    train_step(quantizer, hits(1))
    assert usage(quantizer) == pytest.approx(0.5)
    entropy = -(2 / 3) * math.log(2 / 3) - (1 / 3) * math.log(1 / 3)
    assert perplexity(quantizer) == pytest.approx(math.exp(entropy))
    train_step(quantizer, hits(2))
    train_step(quantizer, hits(3))
    assert usage(quantizer) == pytest.approx(0.75)
    assert perplexity(quantizer) == pytest.approx(3.0)
    quantizer.eval()
    quantizer(hits(0, 0, 0))
    assert quantizer.window_counts().tolist() == [0, 1, 1, 1]


def test_accumulated_micro_batches_count_as_one_step() -> None:
    quantizer = one_hot_quantizer(2)
    train_step(quantizer, hits(0), hits(1), hits(1))
    assert int(quantizer.usage_steps) == 1 and quantizer.window_counts().tolist() == [1, 2, 0, 0]
    train_step(quantizer, hits(2), hits(2))
    train_step(quantizer, hits(3))
    assert quantizer.window_counts().tolist() == [0, 0, 2, 1]
    assert quantizer.steps_since_used.tolist() == [2, 2, 1, 0]


def test_dead_code_steps_count_optimizer_steps_not_micro_batches() -> None:
    torch.manual_seed(0)
    quantizer = make_quantizer(4, 4, dead_code_steps=2)
    set_codes(quantizer, (10 * torch.eye(4)).tolist())
    train_step(quantizer, hits(0), hits(0), hits(0), hits(0))
    assert quantizer.steps_since_used.tolist() == [0, 1, 1, 1]
    assert torch.equal(quantizer.codebook.detach(), 10 * torch.eye(4))
    train_step(quantizer, hits(0), hits(0))
    assert quantizer.steps_since_used.tolist() == [0, 0, 0, 0]
    assert not torch.equal(quantizer.codebook[1:].detach(), 10 * torch.eye(4)[1:])


def test_state_dict_round_trip_keeps_statistics() -> None:
    torch.manual_seed(0)
    quantizer = make_quantizer(16, 4, ema=True, dead_code_steps=5, usage_window=4)
    for _ in range(6):
        train_step(quantizer, torch.randn(2, 4, 2, 2))
    buffer = io.BytesIO()
    torch.save(quantizer.state_dict(), buffer)
    buffer.seek(0)
    restored = make_quantizer(16, 4, ema=True, dead_code_steps=5, usage_window=4)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    for name, tensor in quantizer.state_dict().items():
        assert torch.equal(restored.state_dict()[name], tensor), name
    assert usage(restored) == usage(quantizer) > 0
    assert perplexity(restored) == perplexity(quantizer)
    assert {"usage_counts", "usage_steps", "steps_since_used", "ema_cluster_size", "ema_embed_sum"} <= set(
        quantizer.state_dict()
    )


def test_fp32_under_bfloat16_autocast() -> None:
    torch.manual_seed(0)
    quantizer = make_quantizer(32, 8, codebook_dim=4)
    z = torch.randn(2, 8, 4, 4).to(torch.bfloat16)
    reference = quantizer(z.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = quantizer(z)
        from_indices = quantizer.embed_indices(out.indices)
        nearest = quantizer.nearest_indices(z)
    assert out.z_q.dtype == out.loss.dtype == from_indices.dtype == torch.float32
    assert torch.equal(out.indices, reference.indices) and torch.equal(nearest, reference.indices)
    assert torch.equal(out.z_q, reference.z_q)


def test_nearest_indices_leaves_statistics_alone() -> None:
    torch.manual_seed(0)
    quantizer = make_quantizer(8, 2, ema=True, dead_code_steps=1)
    before = {k: v.clone() for k, v in quantizer.state_dict().items()}
    z = torch.randn(1, 2, 3, 3)
    assert torch.equal(quantizer.nearest_indices(z), quantizer.eval()(z).indices)
    for name, tensor in quantizer.state_dict().items():
        assert torch.equal(before[name], tensor), name


def test_bad_inputs_raise_clear_errors() -> None:
    quantizer = make_quantizer(4, 3)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        quantizer(torch.randn(1, 5, 2, 2))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        quantizer.embed_indices(torch.tensor([[[0, 4]]]))
    with pytest.raises(ValueError, match="integer indices"):
        quantizer.embed_indices(torch.zeros(1, 2, 2))
    for kwargs in [dict(codebook_size=0), dict(codebook_dim=0), dict(usage_window=0), dict(ema_decay=1.0)]:
        with pytest.raises(ValueError):
            make_quantizer(**{"codebook_size": 4, "embed_dim": 3, **kwargs})
    assert "lookup_dim=3" in repr(quantizer)


def _distributed_worker(rank: int, world_size: int, init_file: str, result_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        torch.manual_seed(0)
        quantizer = make_quantizer(16, 2, ema=True, dead_code_steps=2, usage_window=3)
        torch.manual_seed(1 + rank)
        for _ in range(4):
            train_step(quantizer, torch.randn(2, 2, 3, 3) + rank)
        gathered = [torch.zeros_like(quantizer.codebook) for _ in range(world_size)]
        dist.all_gather(gathered, quantizer.codebook)
        if rank == 0:
            torch.save({"codebooks": gathered, "state": quantizer.state_dict()}, result_file)
    finally:
        dist.destroy_process_group()


def test_ranks_keep_identical_codebooks(tmp_path) -> None:
    world_size = 2
    result_file = tmp_path / "result.pt"
    args = (world_size, str(tmp_path / "init"), str(result_file))
    mp.start_processes(_distributed_worker, args=args, nprocs=world_size, start_method="fork")
    result = torch.load(result_file, weights_only=True)
    assert torch.equal(result["codebooks"][0], result["codebooks"][1])
    # Counts are summed over ranks: 4 steps of 2 * 18 vectors, the last 3 kept in the window.
    assert int(result["state"]["usage_counts"].sum()) == 3 * 2 * 18

"""Sliding-window sampling beyond the training grid: taming's window rule, and the sampler's tokens equal to those
of a plain reference that runs the whole window through the GPT for every code, as taming's loop does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from transformer import GPT
from transformer.prior import PriorConfig, VQGANPrior
from transformer.sampling import filter_logits, sample_tokens
from transformer.window import Run, sample_windowed, window_runs, window_start
from vqgan.tiled_decode import decode_grid, decode_in_tiles, tile_starts

K = 12  # image codes
REPO = Path(__file__).resolve().parent.parent


def taming_local(index: int, size: int) -> int:
    """Taming's local position rule for its 16 x 16 window, as written in its sampling scripts."""
    if index <= 8:
        return index
    if size - index < 8:
        return 16 - (size - index)
    return 8


def reference_local(index: int, size: int, window: int) -> int:
    """The same rule for any window: centred at window // 2, stopped by the grid's borders."""
    half = window // 2
    if index <= half:
        return index
    if size - index < window - half:
        return window - (size - index)
    return half


def reference_sample(gpt: GPT, prefix: torch.Tensor, grid: tuple[int, int], window: tuple[int, int],
                     generator: torch.Generator, temperature: float = 1.0, top_k: int | None = None,
                     given: torch.Tensor | None = None) -> torch.Tensor:
    """Taming's loop: for every code, the condition's window and the whole code window through the GPT."""
    (height, width), (h, w) = grid, window
    batch = prefix.shape[0]
    codes = torch.zeros(batch, height, width, dtype=torch.long)
    kept = 0 if given is None else given.shape[1]
    if given is not None:
        codes.view(batch, -1)[:, :kept] = given
    for i in range(height):
        local_i = reference_local(i, height, h)
        for j in range(width):
            if i * width + j < kept:
                continue
            local_j = reference_local(j, width, w)
            rows, columns = slice(i - local_i, i - local_i + h), slice(j - local_j, j - local_j + w)
            condition = prefix[:, rows, columns].flatten(1) if prefix.dim() == 3 else prefix
            patch = torch.cat([condition, codes[:, rows, columns].flatten(1)], dim=1)
            logits = gpt(patch[:, :-1])[0][:, condition.shape[1] - 1:]
            logits = logits.reshape(batch, h, w, -1)[:, local_i, local_j] / temperature
            probs = F.softmax(filter_logits(logits, top_k=top_k), dim=-1)
            codes[:, i, j] = torch.multinomial(probs, 1, generator=generator)[:, 0]
    return codes.view(batch, -1)


def tiny_gpt(prefix_len: int, window: tuple[int, int], vocab: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    gpt = GPT(vocab_size=vocab, block_size=prefix_len + window[0] * window[1] - 1, n_layer=2, n_head=2, n_embd=32,
              dropout=0.0, positions="learned", out_vocab_size=K).eval()
    for p in gpt.parameters():  # larger weights than GPT-2's init, so that the logits depend on the context
        p.data.normal_(0, 0.3)
    return gpt


def test_the_window_rule_is_tamings_for_its_window_of_16():
    for size in (16, 17, 24, 31, 32, 48):
        for index in range(size):
            assert index - window_start(index, size, 16) == taming_local(index, size)


@pytest.mark.parametrize("window", [1, 2, 3, 4, 5, 8])
def test_every_window_fits_the_grid_and_holds_its_position(window):
    for size in range(window, 3 * window + 3):
        for index in range(size):
            start = window_start(index, size, window)
            assert 0 <= start <= size - window and start <= index < start + window
            assert index - start == reference_local(index, size, window)


def test_bad_positions_and_windows_are_refused():
    with pytest.raises(ValueError, match="must lie in the grid"):
        window_start(5, 5, 2)
    with pytest.raises(ValueError, match="window must fit"):
        window_start(0, 3, 4)


def test_runs_group_the_codes_whose_window_stands_still():
    assert window_runs((4, 4), (4, 4)) == [Run(0, 16, 0, 0)]  # the training grid: one run, plain sampling
    assert window_runs((4, 4), (4, 4), start=5) == [Run(5, 11, 0, 0)]
    # one row of 8 with a window of 4: columns 0-2 share the first window, then it moves with every column
    # until column 6, whose window (the last, starting at 4) also serves column 7
    assert window_runs((4, 8), (4, 4))[:5] == [Run(0, 3, 0, 0), Run(3, 1, 0, 1), Run(4, 1, 0, 2), Run(5, 1, 0, 3),
                                               Run(6, 2, 0, 4)]
    runs = window_runs((8, 8), (4, 4))
    assert sum(run.count for run in runs) == 64 and len(runs) == 8 * 5


WINDOWS = [((4, 4), (4, 4)), ((4, 4), (8, 8)), ((3, 3), (7, 9)), ((4, 2), (6, 5)), ((2, 4), (5, 8))]


@pytest.mark.parametrize("window, grid", WINDOWS)
@pytest.mark.parametrize("condition", ["start", "map"])
def test_windowed_tokens_equal_the_reference(window, grid, condition):
    h, w = window
    prefix_len = 1 if condition == "start" else h * w
    gpt = tiny_gpt(prefix_len, window, vocab=K + 6)
    batch = 3
    if condition == "start":
        prefix = torch.full((batch, 1), K + 5)
    else:
        prefix = torch.randint(K, K + 5, (batch, *grid), generator=torch.Generator().manual_seed(1))
    fast = sample_windowed(gpt, prefix, grid, window, generator=torch.Generator().manual_seed(7))
    slow = reference_sample(gpt, prefix, grid, window, torch.Generator().manual_seed(7))
    assert fast.shape == (batch, grid[0] * grid[1]) and torch.equal(fast, slow)
    assert 0 <= fast.min() and fast.max() < K
    greedy = sample_windowed(gpt, prefix, grid, window, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, reference_sample(gpt, prefix, grid, window, torch.Generator(), top_k=1))
    assert not torch.equal(greedy, fast)


def test_windowed_completion_keeps_the_given_codes_and_matches_the_reference():
    window, grid = (3, 3), (6, 7)
    gpt = tiny_gpt(1, window, vocab=K + 1)
    prefix = torch.full((2, 1), K)
    given = torch.randint(K, (2, 17), generator=torch.Generator().manual_seed(2))
    fast = sample_windowed(gpt, prefix, grid, window, given=given, temperature=0.7,
                           generator=torch.Generator().manual_seed(3))
    slow = reference_sample(gpt, prefix, grid, window, torch.Generator().manual_seed(3), temperature=0.7, given=given)
    assert torch.equal(fast[:, :17], given) and torch.equal(fast, slow)


def test_on_the_training_grid_windowed_sampling_is_plain_sampling():
    window = (3, 4)
    gpt = tiny_gpt(1, window, vocab=K + 1)
    prefix = torch.full((4, 1), K)
    windowed = sample_windowed(gpt, prefix, window, window, top_k=5, generator=torch.Generator().manual_seed(4))
    plain = sample_tokens(gpt, prefix, 12, top_k=5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(windowed, plain)


def test_guided_windowed_sampling_runs_the_null_condition_alongside():
    window, grid = (3, 3), (5, 6)
    gpt = tiny_gpt(9, window, vocab=K + 6)
    prefix = torch.randint(K, K + 5, (2, *grid), generator=torch.Generator().manual_seed(5))
    null = torch.full((2, 9), K + 5)
    plain = sample_windowed(gpt, prefix, grid, window, generator=torch.Generator().manual_seed(6))
    scale_one = sample_windowed(gpt, prefix, grid, window, uncond_prefix=null, cfg_scale=1.0,
                                generator=torch.Generator().manual_seed(6))
    guided = sample_windowed(gpt, prefix, grid, window, uncond_prefix=null, cfg_scale=4.0,
                             generator=torch.Generator().manual_seed(6))
    assert torch.equal(plain, scale_one) and not torch.equal(plain, guided)


class GridVQGAN(torch.nn.Module):
    """Stands in for a VQGAN of factor 2 on any image size: a code is the mean of its 2x2 pixels, quantized."""

    codebook_size = K
    downsample_factor = 2
    latent_size = (3, 3)
    resolution = 6

    def encode_to_indices(self, images: torch.Tensor) -> torch.Tensor:
        cells = F.avg_pool2d(images[:, :1], 2)[:, 0]
        return ((cells + 1) / 2 * (K - 1)).round().long().clamp(0, K - 1)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        values = indices.float() / (K - 1) * 2 - 1
        return values[:, None].repeat_interleave(2, -2).repeat_interleave(2, -1)


def tiny_prior(condition: str) -> VQGANPrior:
    torch.manual_seed(0)
    config = PriorConfig(n_layer=1, n_head=2, n_embd=16, condition=condition, coord_levels=8)
    tokenizer = GridVQGAN() if condition == "segmentation" else None
    return VQGANPrior(GridVQGAN(), config, num_classes=3, cond_vqgan=tokenizer).eval()


@pytest.mark.parametrize("condition", ["none", "class", "segmentation", "coord"])
def test_a_prior_samples_a_larger_grid(condition):
    prior = tiny_prior(condition)
    given = {"none": None, "class": [0, 2], "segmentation": torch.rand(2, 1, 10, 14) * 2 - 1,
             "coord": torch.rand(2, 1, 10, 14)}[condition]
    indices, images = prior.sample(2, given, grid=(5, 7), generator=torch.Generator().manual_seed(0))
    assert indices.shape == (2, 5, 7) and images.shape == (2, 1, 10, 14)
    again, _ = prior.sample(2, given, grid=(5, 7), generator=torch.Generator().manual_seed(0))
    assert torch.equal(indices, again)


@pytest.mark.parametrize("grid, given", [((3, 3), 0), ((5, 7), 0), ((5, 7), 9)])
def test_progress_sees_every_code_as_it_is_drawn_without_changing_them(grid, given):
    prior = tiny_prior("class")
    kept = torch.randint(K, (2, given), generator=torch.Generator().manual_seed(3)) if given else None
    seen = []
    indices, _ = prior.sample(2, [0, 2], given=kept, grid=grid, generator=torch.Generator().manual_seed(1),
                              progress=lambda codes, filled: seen.append((codes.clone(), filled)))
    plain, _ = prior.sample(2, [0, 2], given=kept, grid=grid, generator=torch.Generator().manual_seed(1))
    total = grid[0] * grid[1]
    assert torch.equal(indices, plain)
    assert [filled for _, filled in seen] == list(range(given + 1, total + 1))
    for codes, filled in seen:
        assert codes.shape == (2, *grid)
        assert torch.equal(codes.flatten(1)[:, :filled], indices.flatten(1)[:, :filled])


def test_map_conditions_are_cropped_with_the_window():
    prior = tiny_prior("segmentation")
    maps = torch.rand(1, 1, 10, 14) * 2 - 1
    grid_tokens = prior.vqgan.encode_to_indices(maps) + K
    expected = reference_sample(prior.gpt, grid_tokens, (5, 7), (3, 3), torch.Generator().manual_seed(1))
    indices, _ = prior.sample(1, maps, grid=(5, 7), generator=torch.Generator().manual_seed(1))
    assert torch.equal(indices.flatten(1), expected)


def test_bad_grids_and_condition_sizes_are_refused():
    prior = tiny_prior("segmentation")
    with pytest.raises(ValueError, match="smaller than this prior's training grid 3x3"):
        prior.sample(1, torch.zeros(1, 1, 6, 6), grid=(2, 5))
    with pytest.raises(ValueError, match=r"give them at the size of the samples \(10x14\)"):
        prior.sample(1, torch.zeros(1, 1, 6, 6), grid=(5, 7))


def test_tiles_cover_the_grid_with_overlap():
    assert tile_starts(4, 4, 1) == [0] and tile_starts(10, 4, 1) == [0, 3, 6]
    for size in range(4, 30):
        starts = tile_starts(size, 4, 1)
        assert starts[0] == 0 and starts[-1] == size - 4 and all(b - a <= 3 for a, b in zip(starts, starts[1:]))


def test_tiled_decoding_blends_tiles_into_the_one_pass_image():
    vqgan = GridVQGAN()  # decodes each code on its own, so tiles must give exactly the one-pass pixels
    indices = torch.randint(K, (2, 7, 11), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(decode_in_tiles(vqgan, indices, (3, 3)), vqgan.decode_indices(indices), atol=1e-6)


class SmallMemoryVQGAN(GridVQGAN):
    """Runs out of GPU memory on grids larger than 3 x 3."""

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        if indices.shape[1] > 3 or indices.shape[2] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
        return super().decode_indices(indices)


def test_a_grid_too_large_for_memory_decodes_in_tiles():
    indices = torch.randint(K, (1, 5, 8), generator=torch.Generator().manual_seed(1))
    images = decode_grid(SmallMemoryVQGAN(), indices, (3, 3))
    assert torch.allclose(images, GridVQGAN().decode_indices(indices), atol=1e-6)
    with pytest.raises(torch.OutOfMemoryError):  # not even one tile fits
        decode_grid(SmallMemoryVQGAN(), indices, (4, 4))


def test_revisited_windows_reuse_their_caches_and_give_the_same_tokens(monkeypatch):
    window, grid = (3, 3), (7, 8)
    gpt = tiny_gpt(1, window, vocab=K + 1)
    prefix = torch.full((2, 1), K)
    fed = []
    forward_at = GPT.forward_at

    def counting(self, idx, *args, **kwargs):
        fed.append(idx.shape[1])
        return forward_at(self, idx, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward_at", counting)
    runs = {}
    for keep in (0, 64):
        fed.clear()
        runs[keep] = sample_windowed(gpt, prefix, grid, window, window_caches=keep,
                                     generator=torch.Generator().manual_seed(8))
        runs[keep, "tokens"] = sum(fed)
    assert torch.equal(runs[0], runs[64])
    assert torch.equal(runs[64], reference_sample(gpt, prefix, grid, window, torch.Generator().manual_seed(8)))
    assert runs[64, "tokens"] < 0.8 * runs[0, "tokens"]
    # taming's loop feeds the whole window, 1 + 9 - 1 tokens, for each of the 56 codes
    assert runs[64, "tokens"] < 0.5 * 56 * 9


def test_the_benchmark_against_tamings_loop_draws_its_tokens(tmp_path):
    """Runs in its own process: the benchmark puts stand-ins for Lightning into sys.modules."""
    pytest.importorskip("taming")
    out = tmp_path / "window.json"
    subprocess.run([sys.executable, "-m", "benchmarks.window_sampling", "--tiny", "--device", "cpu", "--threads", "1",
                    "--out", str(out)], check=True, cwd=REPO, capture_output=True, timeout=300)
    results = json.loads(out.read_text())["results"]
    assert len(results) == 2 and all(result["same_tokens"] for result in results)
    assert all(result["variants"]["taming"]["per_s"] > 0 for result in results)

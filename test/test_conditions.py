"""Conditional priors: the sequence layout and its loss mask, condition dropout, cached sampling with a condition,
completion, coordinates, the segmentation tokenizer, and a tiny prior that learns to follow its condition."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_DISC, TINY_VQGAN
from test_prior import FakeVQGAN, H, K, W
from torch import nn

from transformer import PriorConfig, VQGANPrior
from transformer.conditions import CoordCondition
from transformer.sampling import sample_tokens
from transformer.training import stage2_step
from utils.training import make_adam
from vqgan import VQGAN, Discriminator, LossConfig, VQGANLoss
from vqgan.loss import reconstruction_loss
from vqgan.training import stage1_step

M = 8  # condition vocabulary
L = H * W  # condition tokens: one per image code here
CPU = torch.device("cpu")


class GridTokenizer(nn.Module):
    """Condition tokenizer stand-in: a map [B, 1, H, W] holds its own token ids."""

    codebook_size = M
    latent_size = (H, W)

    def encode_to_indices(self, maps: torch.Tensor) -> torch.Tensor:
        return maps[:, 0].long()


def map_prior(**options) -> VQGANPrior:
    torch.manual_seed(0)
    config = PriorConfig(**{"n_layer": 2, "n_head": 2, "n_embd": 32, "condition": "segmentation",
                            "condition_dropout": 0.0, **options})
    return VQGANPrior(FakeVQGAN(), config, cond_vqgan=GridTokenizer())


def random_maps(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(M, (count, 1, H, W), generator=torch.Generator().manual_seed(seed))


def test_sequence_layout_and_loss_mask():
    prior = map_prior().eval()
    assert (prior.prefix_len, prior.null_token) == (L, K + M)
    assert prior.gpt.vocab_size == K + M + 1 and prior.gpt.block_size == L + H * W - 1
    maps, indices = random_maps(2), torch.randint(K, (2, H * W))
    tokens = prior.condition_tokens(maps, 2)
    assert torch.equal(tokens, maps.flatten(1))
    inputs, targets = prior.make_inputs(indices, tokens)
    assert torch.equal(inputs[:, :L], K + tokens) and torch.equal(inputs[:, L:], indices[:, :-1])
    assert (targets[:, :L - 1] == -100).all() and torch.equal(targets[:, L - 1:], indices)
    logits, _ = prior.gpt(inputs)
    image_only = F.cross_entropy(logits[:, L - 1:].flatten(0, 1), indices.flatten())
    assert torch.allclose(prior(indices, tokens), image_only)


def test_condition_dropout_replaces_the_whole_condition_by_the_null_token():
    prior = map_prior(condition_dropout=1.0).train()
    inputs, _ = prior.make_inputs(torch.randint(K, (3, H * W)), prior.condition_tokens(random_maps(3), 3))
    assert (inputs[:, :L] == prior.null_token).all()
    kept, _ = map_prior(condition_dropout=0.0).train().make_inputs(torch.randint(K, (3, H * W)),
                                                                   random_maps(3).flatten(1))
    assert (kept[:, :L] < prior.null_token).all()


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_cached_sampling_equals_a_full_recompute_with_a_condition(cfg_scale: float):
    prior = map_prior().eval()
    prefix = prior.prefix_tokens(random_maps(3).flatten(1), 3)
    uncond = torch.full_like(prefix, prior.null_token)
    runs = [sample_tokens(prior.gpt, prefix, H * W, top_k=5, cfg_scale=cfg_scale, uncond_prefix=uncond,
                          generator=torch.Generator().manual_seed(1), use_cache=cached) for cached in (True, False)]
    assert torch.equal(*runs)


@pytest.mark.parametrize("kind", ["none", "class", "segmentation"])
def test_completion_keeps_the_given_codes(kind: str):
    prior = map_prior() if kind == "segmentation" else VQGANPrior(
        FakeVQGAN(), PriorConfig(n_layer=1, n_head=2, n_embd=16, condition=kind), num_classes=3)
    condition = {"none": None, "class": torch.tensor([0, 2, 1, 0]), "segmentation": random_maps(4)}[kind]
    given = torch.randint(K, (4, 4))
    indices, images = prior.eval().sample(4, condition, given=given, generator=torch.Generator().manual_seed(0),
                                          batch_size=3)
    assert torch.equal(indices.flatten(1)[:, :4], given) and images.shape[0] == 4
    with pytest.raises(ValueError, match="first k"):
        prior.sample(4, condition, given=torch.randint(K, (4, H * W)))


def test_a_map_prior_needs_its_maps_and_a_tokenizer():
    prior = map_prior().eval()
    with pytest.raises(ValueError, match="conditioned on segmentation"):
        prior.sample(2)
    with pytest.raises(ValueError, match="needs the stage-1 model"):
        VQGANPrior(FakeVQGAN(), PriorConfig(n_layer=1, n_head=2, n_embd=16, condition="depth"))
    with pytest.raises(ValueError, match="takes none"):
        VQGANPrior(FakeVQGAN(), PriorConfig(n_layer=1, n_head=2, n_embd=16, condition="class"), 3,
                   cond_vqgan=GridTokenizer())


def test_prior_configs_from_before_conditions_still_build():
    prior = VQGANPrior.from_prior_config(FakeVQGAN(), {
        "n_layer": 1, "n_head": 2, "n_embd": 16, "dropout": 0.0, "positions": "learned", "class_conditional": True,
        "class_dropout": 0.2, "pkeep": 1.0, "num_classes": 4, "codebook_size": K, "latent_size": [H, W]})
    assert prior.class_conditional and prior.condition_dropout == 0.2 and prior.null_token == K + 4


def test_coordinates_become_rounded_positions_per_token():
    condition = CoordCondition(levels=4, latent_size=(2, 2), factor=2)
    positions = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4) / 16
    # token cells average positions (0+1+4+5)/64, (2+3+6+7)/64, (8+9+12+13)/64, (10+11+14+15)/64; times 4 levels
    # that is 0.625, 1.125, 2.625, 3.125, rounded as taming's CoordStage rounds
    assert condition.tokens(positions, 1).tolist() == [[1, 1, 3, 3]] and condition.vocab_size == 5
    assert condition.tokens(torch.ones(1, 1, 4, 4), 1).tolist() == [[4, 4, 4, 4]]


def test_segmentation_tokenizer_sees_labels_one_hot_and_learns_them_with_cross_entropy():
    torch.manual_seed(0)
    labels = 5
    model = VQGAN(TINY_VQGAN, in_channels=labels, resolution=16, num_labels=labels).train()
    maps = torch.randint(labels, (4, 1, 4, 4)).repeat_interleave(4, 2).repeat_interleave(4, 3)
    out = model(maps)
    assert out.reconstruction.shape == (4, labels, 16, 16) and model.encode_to_indices(maps).shape == (4, 8, 8)
    assert torch.allclose(reconstruction_loss(maps, out.reconstruction, "cross_entropy"),
                          F.cross_entropy(out.reconstruction, maps[:, 0]))
    loss = VQGANLoss(LossConfig(rec_loss="cross_entropy", perceptual_weight=0.0, disc_weight=0.0)).train()
    disc = Discriminator(labels, TINY_DISC)
    opt_ae, opt_disc = (make_adam(m.parameters(), 3e-3, (0.5, 0.9), 0.0, CPU) for m in (model, disc))
    losses = [float(stage1_step(model, disc, loss, opt_ae, opt_disc, [maps], step, grad_clip=1.0)[0]["rec_loss"])
              for step in range(60)]
    assert losses[-1] < losses[0] / 4, f"cross-entropy {losses[0]:.3f} -> {losses[-1]:.3f}"
    with pytest.raises(ValueError, match="in_channels=5"):
        VQGAN(TINY_VQGAN, in_channels=3, resolution=16, num_labels=labels)


def test_a_tiny_conditional_prior_learns_to_follow_its_condition():
    """Every image code is a fixed function of the condition token at its position; after training on 64 random
    conditions, greedy samples of 32 unseen conditions draw the right code at nearly every position."""
    prior = map_prior(n_layer=2, n_head=4, n_embd=64).train()
    rule = torch.randperm(K, generator=torch.Generator().manual_seed(3))[:M]  # condition token -> image code
    train_maps = random_maps(64, seed=1)
    optimizer = make_adam(prior.param_groups(0.0), 3e-3, (0.9, 0.95), 0.0, CPU)
    for step in range(300):
        batch = train_maps[torch.randperm(64, generator=torch.Generator().manual_seed(step))[:32]]
        tokens = batch.flatten(1)
        stage2_step(prior, optimizer, [(rule[tokens], tokens)], grad_clip=1.0)
    test_maps = random_maps(32, seed=2)
    indices, _ = prior.eval().sample(32, test_maps, top_k=1)
    accuracy = (indices.flatten(1) == rule[test_maps.flatten(1)]).float().mean().item()
    assert accuracy > 0.9, f"{accuracy:.2%} of the codes follow the condition"

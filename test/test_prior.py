"""VQGANPrior: token layout, frozen VQGAN, pkeep and class dropout, training, sampling, errors."""

import pytest
import torch
from conftest import tiny_vqgan
from torch import nn

from transformer import PriorConfig, VQGANPrior

K, H, W = 16, 2, 3


class FakeVQGAN(nn.Module):
    """Stage-1 stand-in: one code per 4x4 patch of a 1-channel image, code = mean brightness level."""

    def __init__(self) -> None:
        super().__init__()
        self.codebook_size = K
        self.latent_size = (H, W)
        self.scale = nn.Parameter(torch.ones(1))
        self.norm = nn.BatchNorm2d(1)

    def encode_to_indices(self, images: torch.Tensor) -> torch.Tensor:
        pooled = nn.functional.avg_pool2d(images, 4)[:, 0]
        return (pooled * K).long().clamp(0, K - 1)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        images = (indices.float()[:, None] + 0.5) / K * self.scale
        return nn.functional.interpolate(self.norm(images), scale_factor=4)


def tiny_prior(num_classes: int = 0, codebook_size: int | None = None, latent_size: tuple | None = None,
               **options) -> VQGANPrior:
    """An unconditional 2 x 32 prior unless ``options`` (fields of :class:`PriorConfig`) say otherwise."""
    torch.manual_seed(0)
    config = PriorConfig(**{"n_layer": 2, "n_head": 2, "n_embd": 32, "condition": "none", **options})
    return VQGANPrior(FakeVQGAN(), config, num_classes, codebook_size=codebook_size, latent_size=latent_size)


def test_token_layout_conditional():
    prior = tiny_prior(condition="class", num_classes=5)
    assert prior.null_token == K + 5
    assert prior.gpt.vocab_size == K + 6 and prior.gpt.out_vocab_size == K and prior.gpt.block_size == H * W
    prefix = prior.prefix_tokens(torch.arange(5), 5)
    assert prefix.flatten().tolist() == [K, K + 1, K + 2, K + 3, K + 4]
    assert (prefix >= K).all() and prior.null_token not in prefix


def test_token_layout_unconditional():
    prior = tiny_prior()
    assert prior.null_token == K and prior.gpt.vocab_size == K + 1 and prior.gpt.out_vocab_size == K
    assert prior.prefix_tokens(None, 3).flatten().tolist() == [K] * 3


def test_vqgan_is_frozen_and_stays_in_eval():
    prior = tiny_prior().train()
    assert prior.training and prior.gpt.training and not prior.vqgan.training
    assert not any(p.requires_grad for p in prior.vqgan.parameters())
    params = [p for group in prior.param_groups(0.1) for p in group["params"]]
    assert len(params) == len(list(prior.gpt.parameters()))


def test_encode_decode_shapes():
    prior = tiny_prior()
    images = torch.rand(3, 1, 4 * H, 4 * W)
    indices = prior.encode(images)
    assert indices.shape == (3, H * W) and indices.dtype == torch.long
    assert prior.decode(indices).shape == (3, 1, 4 * H, 4 * W)


def test_pkeep_one_leaves_inputs_untouched():
    prior = tiny_prior(pkeep=1.0).train()
    indices = torch.randint(K, (8, H * W))
    assert torch.equal(prior.corrupt(indices), indices)
    inputs, targets = prior.make_inputs(indices)
    assert torch.equal(inputs[:, 1:], indices[:, :-1]) and torch.equal(targets, indices)


def test_pkeep_zero_replaces_every_code():
    prior = tiny_prior(pkeep=0.0)
    indices = torch.full((64, H * W), K)  # outside the code range: a kept code would show
    corrupted = prior.corrupt(indices, generator=torch.Generator().manual_seed(0))
    assert ((corrupted >= 0) & (corrupted < K)).all()
    assert len(corrupted.unique()) == K


def test_pkeep_half_keeps_about_half_and_only_in_training():
    prior = tiny_prior(pkeep=0.5).train()
    indices = torch.full((200, H * W), K)
    inputs, targets = prior.make_inputs(indices)
    kept = (inputs[:, 1:] == K).float().mean()
    assert 0.4 < kept < 0.6 and torch.equal(targets, indices)
    prior.eval()
    assert torch.equal(prior.make_inputs(indices)[0][:, 1:], indices[:, :-1])


def test_class_dropout():
    labels = torch.arange(4).repeat(50)
    indices = torch.randint(K, (200, H, W))
    always = tiny_prior(condition="class", num_classes=4, condition_dropout=1.0).train()
    assert (always.make_inputs(indices, labels)[0][:, 0] == always.null_token).all()
    assert torch.equal(always.eval().make_inputs(indices, labels)[0][:, 0], labels + K)
    half = tiny_prior(condition="class", num_classes=4, condition_dropout=0.5).train()
    dropped = (half.make_inputs(indices, labels)[0][:, 0] == half.null_token).float().mean()
    assert 0.35 < dropped < 0.65


def test_bad_labels_and_shapes():
    cond = tiny_prior(condition="class", num_classes=4)
    indices = torch.randint(K, (2, H * W))
    with pytest.raises(ValueError, match="class id 4 is out of range.*0..3"):
        cond.check_labels(torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="class id -1"):
        cond.check_labels(torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="class-conditional"):
        cond(indices)
    with pytest.raises(ValueError, match="expected 6 codes"):
        cond(torch.randint(K, (2, 5)), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="unconditional"):
        tiny_prior()(indices, torch.tensor([0, 1]))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        tiny_prior(condition="class")
    with pytest.raises(ValueError, match="17 codes"):
        tiny_prior(codebook_size=17)
    with pytest.raises(ValueError, match="latents"):
        tiny_prior(latent_size=(4, 4))


def test_config_rebuilds_the_prior():
    prior = tiny_prior(condition="class", num_classes=3, positions="rotary", pkeep=0.9)
    config = prior.prior_config
    assert config["codebook_size"] == K and config["latent_size"] == [H, W] and config["num_classes"] == 3
    rebuilt = VQGANPrior.from_prior_config(FakeVQGAN(), config)
    rebuilt.load_state_dict(prior.state_dict())
    indices = torch.randint(K, (2, H * W))
    labels = torch.tensor([0, 2])
    torch.testing.assert_close(rebuilt.eval()(indices, labels), prior.eval()(indices, labels))


def test_overfits_a_handful_of_sequences():
    prior = tiny_prior(condition="class", num_classes=4, condition_dropout=0.0).train()
    indices = torch.randint(K, (4, H * W))
    labels = torch.arange(4)
    opt = torch.optim.AdamW(prior.param_groups(0.0), lr=1e-2)
    for _ in range(60):
        loss = prior(indices, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    sampled, _ = prior.sample(4, labels, temperature=0.1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled.flatten(1), indices)


def test_sample_shapes_batches_and_determinism():
    prior = tiny_prior(condition="class", num_classes=3).train()
    indices, images = prior.sample(5, [0, 1, 2, 0, 1], top_k=4, cfg_scale=2.0, batch_size=2,
                                   generator=torch.Generator().manual_seed(0))
    assert indices.shape == (5, H, W) and images.shape == (5, 1, 4 * H, 4 * W)
    assert ((indices >= 0) & (indices < K)).all()
    assert prior.training and not prior.vqgan.training
    again, _ = prior.sample(5, [0, 1, 2, 0, 1], top_k=4, cfg_scale=2.0, batch_size=2,
                            generator=torch.Generator().manual_seed(0))
    assert torch.equal(indices, again)
    one_class, _ = prior.sample(3, 2, generator=torch.Generator().manual_seed(0))
    random_classes, _ = prior.sample(3, generator=torch.Generator().manual_seed(0))
    assert one_class.shape == random_classes.shape == (3, H, W)


def test_unconditional_sampling():
    indices, images = tiny_prior().sample(2, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert indices.shape == (2, H, W) and images.shape == (2, 1, 4 * H, 4 * W)


def test_sample_errors_name_the_fix():
    cond = tiny_prior(condition="class", num_classes=3)
    with pytest.raises(ValueError, match="class id 3 is out of range.*0..2"):
        cond.sample(2, [0, 3])
    with pytest.raises(ValueError, match="2 samples"):
        cond.sample(2, [0, 1, 2])
    uncond = tiny_prior()
    with pytest.raises(ValueError, match="unconditional.*takes no condition; drop it"):
        uncond.sample(2, 1)
    with pytest.raises(ValueError, match="cfg_scale=3.0.*cfg_scale=1"):
        uncond.sample(2, cfg_scale=3.0)


def test_with_a_real_vqgan():
    torch.manual_seed(0)
    vqgan = tiny_vqgan(ch=32, attn_resolutions=(), z_channels=16, codebook_size=32, embed_dim=16)
    prior = VQGANPrior(vqgan, PriorConfig(n_layer=1, n_head=2, n_embd=32), num_classes=2)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    indices = prior.encode(images)
    assert indices.shape == (2, 64)
    loss = prior(indices, torch.tensor([0, 1]))
    loss.backward()
    assert vqgan.quantizer.codebook_size == 32 and all(p.grad is None for p in vqgan.parameters())
    sampled, decoded = prior.sample(2, [1, 0], cfg_scale=1.5, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (2, 8, 8) and decoded.shape == (2, 3, 16, 16)

"""VQGAN loss: GAN loss values, adaptive weight, fused vs reference backward, LeCam, schedule, state."""

import math

import pytest
import torch
from torch import nn

from benchmarks.reference import reference_generator_backward
from utils.logging import as_floats
from vqgan.loss import (
    LossConfig,
    VQGANLoss,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
    lecam_regularizer,
    reconstruction_loss,
    vanilla_d_loss,
    vanilla_g_loss,
)

DISC_START = 3


class TinyAutoencoder(nn.Module):
    """Conv encoder, a stand-in codebook loss, and a decoder whose last layer is the output conv."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Conv2d(3, 4, 3, padding=1)
        self.decoder = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x)
        return self.decoder(z), z.square().mean()


def tiny_discriminator() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 4, stride=2, padding=1), nn.BatchNorm2d(8), nn.LeakyReLU(0.2), nn.Conv2d(8, 1, 3, padding=1)
    )


def make_loss(lpips_files=None, **overrides) -> VQGANLoss:
    options = dict(perceptual_weight=0.0, disc_start=DISC_START, codebook_weight=0.7, disc_weight=0.6)
    if lpips_files is not None:
        options.update(perceptual_weight=0.5, lpips_vgg_path=str(lpips_files.vgg),
                       lpips_heads_path=str(lpips_files.heads))
    return VQGANLoss(LossConfig(**(options | overrides)))


def generator_step(loss: VQGANLoss, step: int, fused: bool, scale: float = 1.0, constant_codebook: bool = False):
    torch.manual_seed(0)
    autoencoder, discriminator = TinyAutoencoder(), tiny_discriminator()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    reconstruction, codebook_loss = autoencoder(x)
    if constant_codebook:
        codebook_loss = torch.tensor(0.3)
    last_layer = autoencoder.decoder[-1].weight
    if fused:
        logs = loss.generator_backward(x, reconstruction, codebook_loss, discriminator, last_layer, step, scale)
    else:
        logs = reference_generator_backward(loss, x, reconstruction, codebook_loss, discriminator, last_layer, step,
                                            scale)
    grads = {name: p.grad.clone() for name, p in autoencoder.named_parameters()}
    return grads, as_floats(logs), discriminator


def test_reconstruction_and_gan_losses_on_known_values() -> None:
    zeros, twos = torch.zeros(2, 3), torch.full((2, 3), 2.0)
    assert reconstruction_loss(zeros, twos, "l1").item() == pytest.approx(2.0)
    assert reconstruction_loss(zeros, twos, "l2").item() == pytest.approx(4.0)
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.5 + 0.75))
    assert vanilla_d_loss(torch.zeros(3), torch.zeros(3)).item() == pytest.approx(math.log(2))
    big = torch.tensor([30.0])
    assert vanilla_d_loss(big, -big).item() == pytest.approx(0.0, abs=1e-6)
    assert hinge_g_loss(torch.tensor([1.0, 3.0])).item() == pytest.approx(-2.0)
    assert vanilla_g_loss(torch.zeros(4)).item() == pytest.approx(math.log(2))


def test_lecam_regularizer_on_known_values() -> None:
    value = lecam_regularizer(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 2.0]), torch.tensor(0.5), torch.tensor(1.5))
    assert value.item() == pytest.approx(2.25)


def test_adaptive_weight_formula_and_clamp() -> None:
    grad_needs = torch.tensor(2.0, requires_grad=True)
    weight = adaptive_weight(grad_needs, torch.tensor(1.0), 1e4)
    assert weight.item() == pytest.approx(2.0 / (1.0 + 1e-4)) and not weight.requires_grad
    assert adaptive_weight(torch.tensor(10.0), torch.tensor(0.0), 5.0).item() == 5.0


def test_constructor_validates() -> None:
    assert VQGANLoss(LossConfig(perceptual_weight=0.0)).lpips is None
    with pytest.raises(ValueError, match="rec_loss"):
        VQGANLoss(LossConfig(rec_loss="l3", perceptual_weight=0.0))
    with pytest.raises(ValueError, match="disc_loss"):
        VQGANLoss(LossConfig(disc_loss="wgan", perceptual_weight=0.0))


def test_gan_factor_schedule() -> None:
    ramped = make_loss(disc_start=10, disc_weight=0.8, disc_warmup_steps=4)
    assert [ramped.gan_factor(s) for s in (0, 9, 10, 11, 13, 100)] == pytest.approx([0, 0, 0.2, 0.4, 0.8, 0.8])
    direct = make_loss(disc_start=10, disc_weight=0.8)
    assert [direct.gan_factor(s) for s in (9, 10, 11)] == pytest.approx([0, 0.8, 0.8])


def test_adaptive_weight_equals_direct_autograd_reference() -> None:
    loss = make_loss()
    _, logs, _ = generator_step(loss, DISC_START + 1, fused=True)
    torch.manual_seed(0)
    autoencoder, discriminator = TinyAutoencoder(), tiny_discriminator()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    reconstruction, _ = autoencoder(x)
    last = autoencoder.decoder[-1].weight
    rec_grad = torch.autograd.grad((x - reconstruction).abs().mean(), last, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(-discriminator(reconstruction).mean(), last)[0]
    expected = (rec_grad.norm() / (gan_grad.norm() + 1e-4)).item()
    assert logs["d_weight"] == pytest.approx(expected, rel=1e-5)
    assert logs["gan_factor"] == pytest.approx(0.6)


def test_adaptive_weight_is_clamped() -> None:
    _, logs, _ = generator_step(make_loss(adaptive_weight_max=1e-3), DISC_START, fused=True)
    assert logs["d_weight"] == pytest.approx(1e-3)


@pytest.mark.parametrize(
    ("step", "perceptual", "options", "scale", "constant_codebook"),
    [
        (0, False, {}, 1.0, False),
        (0, True, {}, 0.5, False),
        (DISC_START + 1, False, {}, 0.5, False),
        (DISC_START + 1, True, {"disc_loss": "vanilla", "rec_loss": "l2"}, 0.25, False),
        (DISC_START, False, {"adaptive_weight": False, "disc_warmup_steps": 3}, 2.0, True),
    ],
)
def test_fused_backward_matches_reference(
    lpips_files, step: int, perceptual: bool, options: dict, scale: float, constant_codebook: bool
) -> None:
    loss = make_loss(lpips_files if perceptual else None, **options)
    fused, fused_logs, fused_disc = generator_step(loss, step, True, scale, constant_codebook)
    reference, reference_logs, reference_disc = generator_step(loss, step, False, scale, constant_codebook)
    for name in reference:
        torch.testing.assert_close(fused[name], reference[name], rtol=1e-4, atol=1e-7)
    assert fused_logs == pytest.approx(reference_logs, rel=1e-5)
    for discriminator in (fused_disc, reference_disc):
        assert all(p.grad is None and p.requires_grad for p in discriminator.parameters())
    if step < DISC_START:
        assert fused_logs["d_weight"] == fused_logs["g_loss"] == fused_logs["gan_factor"] == 0.0
        assert all(m.num_batches_tracked == 0 for m in fused_disc.modules() if isinstance(m, nn.BatchNorm2d))
    assert (fused_logs["p_loss"] > 0) == perceptual


def test_scale_multiplies_the_gradients() -> None:
    loss = make_loss()
    once, logs, _ = generator_step(loss, DISC_START, True, scale=1.0)
    thrice, _, _ = generator_step(loss, DISC_START, True, scale=3.0)
    for name in once:
        torch.testing.assert_close(thrice[name], 3 * once[name])
    expected_total = logs["rec_loss"] + 0.7 * logs["codebook_loss"] + logs["d_weight"] * 0.6 * logs["g_loss"]
    assert logs["total"] == pytest.approx(expected_total)


def test_perceptual_loss_module_stays_frozen_and_out_of_the_training_state(lpips_files) -> None:
    loss = make_loss(lpips_files)
    loss.train()
    assert loss.lpips is not None and not loss.lpips.training
    assert all(not p.requires_grad for p in loss.lpips.parameters())
    assert set(loss.lecam.state_dict()) == {"real", "fake", "ready"}


def test_discriminator_loss_with_lecam_anchors_and_state_round_trip() -> None:
    loss = make_loss(lecam_weight=0.5, lecam_decay=0.9)
    discriminator = nn.Identity()
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-1.0, 2.0])
    value, logs = loss.discriminator_loss(real, fake, discriminator)
    logs = as_floats(logs)
    assert loss.lecam.real.item() == pytest.approx(2.0) and loss.lecam.fake.item() == pytest.approx(0.5)
    expected_lecam = lecam_regularizer(real, fake, torch.tensor(2.0), torch.tensor(0.5)).item()
    assert logs["lecam_loss"] == pytest.approx(expected_lecam)
    assert value.item() == pytest.approx(hinge_d_loss(real, fake).item() + 0.5 * expected_lecam)
    assert logs["logits_real"] == pytest.approx(2.0) and logs["logits_fake"] == pytest.approx(0.5)

    loss.discriminator_loss(real + 1, fake + 1, discriminator)
    assert loss.lecam.real.item() == pytest.approx(0.9 * 2.0 + 0.1 * 3.0)
    assert loss.lecam.fake.item() == pytest.approx(0.9 * 0.5 + 0.1 * 1.5)

    restored = make_loss(lecam_weight=0.5, lecam_decay=0.9)
    restored.lecam.load_state_dict(loss.lecam.state_dict())
    for key, tensor in loss.lecam.state_dict().items():
        assert torch.equal(restored.lecam.state_dict()[key], tensor)
    with pytest.raises(RuntimeError, match="ready"):
        make_loss(lecam_weight=0.5).lecam.load_state_dict({"real": torch.tensor(0.0), "fake": torch.tensor(0.0)})

    restored.eval()
    restored.discriminator_loss(real + 5, fake, discriminator)
    assert restored.lecam.real.item() == pytest.approx(2.1)


def test_discriminator_loss_detaches_the_reconstruction() -> None:
    loss = make_loss(disc_loss="vanilla")
    discriminator = tiny_discriminator()
    x = torch.rand(2, 3, 16, 16)
    reconstruction = torch.rand(2, 3, 16, 16, requires_grad=True)
    after, logs = loss.discriminator_loss(x, reconstruction, discriminator)
    logs = as_floats(logs)
    assert after.item() == pytest.approx(logs["d_loss"]) and logs["lecam_loss"] == 0.0
    after.backward()
    assert reconstruction.grad is None
    assert all(p.grad is not None for p in discriminator.parameters())

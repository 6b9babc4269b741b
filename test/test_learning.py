"""Both stages learn: tiny models overfit a fixed batch through the real training steps, on the CPU.

Thresholds, with their margins (checked over seeds 0-3 when they were set):

* stage 1, 16x16 images (smooth random patterns), 150 steps of :func:`vqgan.training.stage1_step` at lr 3e-3:
  the reconstruction loss (L1) of the last 5 steps is at most a third of the first step's, with the GAN off
  and with it on from step 0 (seen: 4.7-5.7x off, 3.9-4.8x on);
* stage 2, 4 class-conditional sequences of 64 codes out of 16, 100 steps of
  :func:`transformer.training.stage2_step` at lr 3e-3: the cross-entropy falls from about ln 16 = 2.77 nats
  to below 0.05 (seen: 0.007-0.008).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_DISC, tiny_vqgan

from transformer import VQGANPrior
from transformer.prior import PriorConfig
from transformer.training import stage2_step
from utils.training import make_adam
from vqgan import Discriminator, LossConfig, VQGANLoss
from vqgan.training import stage1_step

CPU = torch.device("cpu")
STAGE1_STEPS, STAGE1_FACTOR = 150, 3.0
STAGE2_STEPS, STAGE2_BELOW = 100, 0.05


def smooth_images(count: int, seed: int) -> torch.Tensor:
    """``count`` 16x16 RGB images in [-1, 1]: random 4x4 patterns, upsampled bilinearly."""
    coarse = torch.rand(count, 3, 4, 4, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return F.interpolate(coarse, size=16, mode="bilinear", align_corners=False)


@pytest.mark.parametrize("disc_start", [10**9, 0], ids=["GAN off", "GAN on"])
def test_stage1_overfits_a_fixed_batch(disc_start: int) -> None:
    torch.manual_seed(0)
    model, disc = tiny_vqgan().train(), Discriminator(3, TINY_DISC).train()
    loss = VQGANLoss(LossConfig(perceptual_weight=0.0, disc_start=disc_start)).train()
    opt_ae, opt_disc = (make_adam(m.parameters(), 3e-3, (0.5, 0.9), 0.0, CPU) for m in (model, disc))
    images = smooth_images(8, seed=0)
    losses = []
    for step in range(STAGE1_STEPS):
        logs, check = stage1_step(model, disc, loss, opt_ae, opt_disc, [images], step, grad_clip=1.0)
        losses.append(float(logs["rec_loss"]))
    assert check.cause() is None and (float(logs["gan_factor"]) > 0) == (disc_start == 0)
    last = sum(losses[-5:]) / 5
    assert last <= losses[0] / STAGE1_FACTOR, f"rec_loss {losses[0]:.3f} -> {last:.3f} in {STAGE1_STEPS} steps"


def test_stage2_overfits_a_fixed_token_set() -> None:
    torch.manual_seed(0)
    config = PriorConfig(n_layer=2, n_head=2, n_embd=32, condition="class", condition_dropout=0.0)
    prior = VQGANPrior(tiny_vqgan(), config, num_classes=4).train()
    optimizer = make_adam(prior.param_groups(0.0), 3e-3, (0.9, 0.95), 0.0, CPU)
    indices = torch.randint(16, (4, 64), generator=torch.Generator().manual_seed(0))
    labels = torch.arange(4)  # one sequence per class, so every code is predictable
    losses = []
    for _ in range(STAGE2_STEPS):
        logs, _ = stage2_step(prior, optimizer, [(indices, labels)], grad_clip=1.0)
        losses.append(float(logs["loss"]))
    assert losses[0] > 2.5 and losses[-1] < STAGE2_BELOW, f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"

"""Stage-1 benchmarks: the VQGAN training step (optimized vs straightforward), encoding and decoding.

The optimized training step is the one ``train_vqgan.py`` takes: one autoencoder forward, the
fused generator backward, then the discriminator step on the detached reconstruction. The
straightforward step is the reference formulation: the adaptive weight from two ``autograd.grad``
calls on the decoder's last layer followed by a full backward, and a second autoencoder forward
for the discriminator step. Both are :func:`training_step` with different switches.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.report import record
from benchmarks.runtime import Runtime, optimized, reference
from benchmarks.timing import count_flops, time_alternating
from pipeline.builders import build_models
from utils.config import Stage1Config, load_config
from vqgan import VQGAN, Discriminator, VQGANLoss

NEVER = 10**12


@dataclass(frozen=True)
class Stage1Case:
    """A model to benchmark: a config file, overrides (image size, sizes), and a batch size."""

    name: str
    config: str
    overrides: tuple[str, ...]
    batch: int

    def load(self, losses_on: bool, lpips_files: tuple[Path, Path] | None) -> Stage1Config:
        """The case's config with perceptual and GAN losses both on (GAN active from step 0) or both off."""
        if losses_on:
            vgg, heads = lpips_files
            losses = ["loss.perceptual_weight=1.0", "loss.disc_start=0", f"loss.lpips_vgg_path={vgg}",
                      f"loss.lpips_heads_path={heads}"]
        else:
            losses = ["loss.perceptual_weight=0.0", f"loss.disc_start={NEVER}"]
        return load_config(Stage1Config, self.config, [*self.overrides, *losses])


@dataclass
class Stage1Setup:
    """Models, loss, optimizers and a fixed batch of images for one runtime."""

    model: VQGAN
    disc: Discriminator
    loss: VQGANLoss
    opt_ae: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    images: torch.Tensor
    runtime: Runtime
    grad_clip: float


def build_setup(cfg: Stage1Config, batch: int, runtime: Runtime, seed: int = 0) -> Stage1Setup:
    """Models as ``train_vqgan.py`` builds them (same seed, same weights for every runtime)."""
    torch.manual_seed(seed)
    model, disc, loss = build_models(cfg)
    device, memory_format = runtime.device, runtime.memory_format
    model.to(device, memory_format=memory_format).train()
    disc.to(device, memory_format=memory_format).train()
    loss.to(device).train()
    train = cfg.train
    opt_ae = runtime.adam(model.parameters(), train.lr, train.betas, train.weight_decay)
    opt_d = runtime.adam(disc.parameters(), train.disc_lr or train.lr, train.betas, train.weight_decay)
    size, channels = cfg.data.image_size, cfg.data.channels
    images = (torch.rand(batch, channels, size, size) * 2 - 1).to(device, memory_format=memory_format)
    return Stage1Setup(model, disc, loss, opt_ae, opt_d, images, runtime, train.grad_clip)


def _clip(module: torch.nn.Module, max_norm: float) -> None:
    params = [p for p in module.parameters() if p.grad is not None]
    if params and max_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_norm)


def training_step(setup: Stage1Setup, step: int, *, fused: bool, reuse_reconstruction: bool) -> dict[str, float]:
    """One stage-1 optimizer step (autoencoder, then discriminator once the GAN is active).

    ``fused`` selects the fused generator backward (else the reference two-``autograd.grad``
    formulation); ``reuse_reconstruction`` feeds the discriminator the detached reconstruction of
    the autoencoder forward already taken (else a second forward produces it, as in the reference
    implementation; that forward records no autograd graph, which only favours the reference).
    """
    model, disc, loss, images, runtime = setup.model, setup.disc, setup.loss, setup.images, setup.runtime
    setup.opt_ae.zero_grad(set_to_none=True)
    setup.opt_d.zero_grad(set_to_none=True)
    disc_active = loss.gan_factor(step) > 0
    with runtime.backends():
        with runtime.autocast():
            out = model(images)
            logs = loss.generator_backward(images, out.reconstruction, out.codebook_loss, disc, model.last_layer,
                                           step, fused=fused)
        if disc_active:
            with runtime.autocast():
                if reuse_reconstruction:
                    fake = out.reconstruction.detach()
                else:
                    with torch.no_grad():
                        fake = model(images).reconstruction
                d_loss, d_logs = loss.discriminator_loss(images, fake, disc, step)
            d_loss.backward()
            logs.update(d_logs)
        _clip(model, setup.grad_clip)
        setup.opt_ae.step()
        if disc_active:
            _clip(disc, setup.grad_clip)
            setup.opt_d.step()
    return logs


def _setups(cfg: Stage1Config, batch: int, device: torch.device) -> tuple[Stage1Setup, Stage1Setup]:
    """Setups for the optimized and reference runtimes (one shared setup where they coincide)."""
    fast = build_setup(cfg, batch, optimized(device))
    slow = fast if reference(device) == fast.runtime else build_setup(cfg, batch, reference(device))
    return fast, slow


def bench_training(case: Stage1Case, losses_on: bool, lpips_files: tuple[Path, Path], device: torch.device, *,
                   reps: int, warmup: int) -> dict[str, Any]:
    """Images/s of the optimized vs the straightforward training step, with FLOPs per image."""
    cfg = case.load(losses_on, lpips_files)
    fast, slow = _setups(cfg, case.batch, device)
    variants = {
        "optimized": lambda: training_step(fast, 0, fused=True, reuse_reconstruction=True),
        "straightforward": lambda: training_step(slow, 0, fused=False, reuse_reconstruction=False),
    }
    timings = time_alternating(variants, device, reps=reps, warmup=warmup)
    flops = {name: count_flops(fn) for name, fn in variants.items()}
    losses = "rec+LPIPS+GAN" if losses_on else "rec only"
    return record(f"stage1_train/{case.name}/{'full' if losses_on else 'rec'}",
                  f"stage-1 train {case.name} {cfg.data.image_size}px b{case.batch}, {losses}",
                  "img/s", case.batch, timings, flops=flops,
                  extra={"model": case.name, "resolution": cfg.data.image_size, "batch": case.batch,
                         "perceptual_and_gan": losses_on,
                         "runtimes": {"optimized": fast.runtime.describe(), "straightforward": slow.runtime.describe()},
                         "model_config": dataclasses.asdict(cfg.model)})


def bench_codec(case: Stage1Case, device: torch.device, *, reps: int, warmup: int) -> list[dict[str, Any]]:
    """Images/s of ``encode_to_indices`` and ``decode_indices`` (eval mode, no autograd)."""
    cfg = case.load(False, None)
    fast, slow = _setups(cfg, case.batch, device)
    setups = {"optimized": fast} if slow is fast else {"optimized": fast, "reference": slow}
    for setup in setups.values():
        setup.model.eval()

    def encode(setup: Stage1Setup) -> torch.Tensor:
        with torch.no_grad(), setup.runtime.backends(), setup.runtime.autocast():
            return setup.model.encode_to_indices(setup.images)

    indices = encode(fast)

    def decode(setup: Stage1Setup) -> torch.Tensor:
        with torch.no_grad(), setup.runtime.backends(), setup.runtime.autocast():
            return setup.model.decode_indices(indices)

    results = []
    for label, fn in (("encode", encode), ("decode", decode)):
        variants = {name: (lambda s=setup, f=fn: f(s)) for name, setup in setups.items()}
        timings = time_alternating(variants, device, reps=reps, warmup=warmup)
        flops = {name: count_flops(call) for name, call in variants.items()}
        results.append(record(f"{label}/{case.name}", f"{label} {case.name} {cfg.data.image_size}px b{case.batch}",
                              "img/s", case.batch, timings, flops=flops,
                              extra={"model": case.name, "resolution": cfg.data.image_size, "batch": case.batch}))
    return results

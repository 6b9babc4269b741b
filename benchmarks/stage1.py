"""Stage-1 benchmarks: the VQGAN training step (optimized vs straightforward), encoding and decoding.

The optimized training step is :func:`vqgan.training.stage1_step`, the one ``train_vqgan.py`` takes:
one autoencoder forward, the fused generator backward, then the discriminator step on the detached
reconstruction. The straightforward step is :func:`benchmarks.reference.reference_stage1_step`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.reference import reference_stage1_step
from benchmarks.report import record
from benchmarks.runtime import Runtime, optimized, reference
from benchmarks.timing import count_flops, synchronize, time_alternating
from utils.config import load_config
from utils.device import conv_memory_format
from utils.training import compile_module
from vqgan import VQGAN, Discriminator, VQGANLoss
from vqgan.config import Stage1Config, build_stage1
from vqgan.training import stage1_step

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
    model, disc, loss = build_stage1(cfg)
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


def training_step(setup: Stage1Setup, step: int, train_model: torch.nn.Module | None = None,
                  train_disc: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """One optimizer step of :func:`vqgan.training.stage1_step` in the setup's runtime, through the
    wrappers ``train_model`` / ``train_disc`` (e.g. compiled) where given; its logs."""
    with setup.runtime.backends():
        return stage1_step(setup.model, setup.disc, setup.loss, setup.opt_ae, setup.opt_d, [setup.images], step,
                           grad_clip=setup.grad_clip, amp_dtype=setup.runtime.amp_dtype, train_model=train_model,
                           train_disc=train_disc)[0]


def straightforward_step(setup: Stage1Setup, step: int) -> dict[str, float]:
    """One optimizer step the reference way (see :mod:`benchmarks.reference`)."""
    with setup.runtime.backends(), setup.runtime.autocast():
        return reference_stage1_step(setup.model, setup.disc, setup.loss, setup.opt_ae, setup.opt_d, setup.images,
                                     step, setup.grad_clip)


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
        "optimized": lambda: training_step(fast, 0),
        "straightforward": lambda: straightforward_step(slow, 0),
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


def fresh_compile_cache() -> contextlib.AbstractContextManager:
    """``torch.compile``'s caches emptied and its on-disk caches in a new temporary folder for the duration:
    a compile takes as long as in a first run, not as long as reading back what was compiled before."""
    from torch._inductor import utils as inductor_utils

    fresh = getattr(inductor_utils, "fresh_cache", None) or inductor_utils.fresh_inductor_cache
    return fresh()


def bench_compiled(case: Stage1Case, lpips_files: tuple[Path, Path], device: torch.device, *, reps: int,
                   warmup: int) -> dict[str, Any]:
    """Images/s of :func:`vqgan.training.stage1_step` with the models under ``torch.compile`` (as
    ``train.compile=true`` trains them, in its memory format) against the eager models, LPIPS and GAN on;
    the first compiled call, compilation included (empty compile caches), is reported as ``compile_s``."""
    with fresh_compile_cache():
        return _bench_compiled(case, lpips_files, device, reps=reps, warmup=warmup)


def _bench_compiled(case: Stage1Case, lpips_files: tuple[Path, Path], device: torch.device, *, reps: int,
                    warmup: int) -> dict[str, Any]:
    cfg = case.load(True, lpips_files)
    eager_runtime = optimized(device)
    memory_format = conv_memory_format(device, cfg.train.channels_last, compiled=True)
    compiled_runtime = dataclasses.replace(eager_runtime, channels_last=memory_format == torch.channels_last)
    eager, compiled = build_setup(cfg, case.batch, eager_runtime), build_setup(cfg, case.batch, compiled_runtime)
    torch._dynamo.reset()  # a fresh compile, as a training run starts with, not one shaped by earlier cases
    compiled_model, compiled_disc = compile_module(compiled.model), compile_module(compiled.disc)

    def compiled_step() -> dict[str, float]:
        return training_step(compiled, 0, compiled_model, compiled_disc)

    started = time.perf_counter()
    compiled_step()
    synchronize(device)
    compile_s = time.perf_counter() - started
    timings = time_alternating({"compiled": compiled_step, "eager": lambda: training_step(eager, 0)}, device,
                               reps=reps, warmup=warmup)
    return record(f"stage1_compiled/{case.name}",
                  f"stage-1 train {case.name} {cfg.data.image_size}px b{case.batch}, rec+LPIPS+GAN, compiled vs eager",
                  "img/s", case.batch, timings,
                  extra={"model": case.name, "compile_s": compile_s,
                         "runtimes": {"compiled": compiled.runtime.describe(), "eager": eager.runtime.describe()}})


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

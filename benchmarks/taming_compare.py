"""Side by side with the official implementation: taming-transformers against this repository.

Runs only where the reference package is installed (it is never a requirement of this repository):

    pip install --no-deps taming-transformers-rom1504 einops requests

Both sides get the same architectures, the same batches and the same settings, and are timed
alternately in one process (:func:`benchmarks.timing.time_alternating`):

* the stage-1 training step as taming's Lightning module takes it: two optimizer passes, each with
  its own autoencoder forward, the adaptive GAN weight from two ``autograd.grad`` calls, against
  :func:`vqgan.training.stage1_step`; for the ``fashion_mnist_small`` architecture (32x32, batch 32)
  and the f16 model at 64x64 (batch 8), with the GAN on;
* ``mingpt.sample_with_past`` against :func:`transformer.sample_tokens` (KV cache), GPT 8 x 256, 8
  heads, 512 codes, batch 16, 64 tokens, top-k 100;
* the GPT training step (forward, cross-entropy, backward, AdamW) against
  :func:`transformer.training.stage2_step`, same GPT, batch 16 x 64 tokens.

Stand-ins make the reference importable offline. ``taming.models.cond_transformer`` (whose
``Net2NetTransformer.top_k_logits`` the sliding-window comparison calls) imports PyTorch Lightning and
``taming.main`` (which imports Lightning and OmegaConf) for its base class and ``instantiate_from_config``:
they are given ``nn.Module`` and :func:`instantiate_from_config` below. Its ``mingpt`` imports
``top_k_top_p_filtering`` from ``transformers`` (a large package whose recent releases no longer have
it): :func:`top_k_top_p_filtering` below does what that function did and is called, and timed, by
``sample_with_past`` with top-k. Its LPIPS downloads VGG16 weights when built: here it is built on
an untrained VGG16 and never called, because these stage-1 cases train without the perceptual loss
on both sides.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.cli import benchmark_parser, parse_benchmark_args
from benchmarks.report import print_and_save, record
from benchmarks.stage1 import Stage1Case
from benchmarks.stage2 import GPTCase, training_settings
from benchmarks.timing import Timing, convolution_share, count_flops, time_alternating
from transformer import sample_tokens
from transformer.training import stage2_step
from utils.config import load_config
from utils.device import autocast_dtype
from utils.training import make_adam
from vqgan.config import Stage1Config, build_stage1
from vqgan.training import stage1_step

# Speed-ups over the official implementation that this repository aims for (2 CPU cores or a GPU).
VS_TAMING_TARGETS = {"stage1/fashion_mnist_small/fp32": 2.0, "sampling": 3.0, "stage2_train/fp32": 1.5,
                     "stage2_train/bf16": 2.5}
CEILING_FRACTION = 1 / 3  # sampling within 3x of the arithmetic ceiling
CONV_PEAK_FRACTION = 0.85  # where the stage-1 step cannot be 2x faster, it must run near the convolution ceiling
REFERENCE_PACKAGE = "taming"
INSTALL_HINT = "pip install --no-deps taming-transformers-rom1504 einops requests"


def reference_available() -> bool:
    return importlib.util.find_spec(REFERENCE_PACKAGE) is not None


def top_k_top_p_filtering(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0,
                          filter_value: float = -float("inf"), min_tokens_to_keep: int = 1) -> torch.Tensor:
    """What ``transformers.top_k_top_p_filtering`` did: mask logits below the k-th largest, then outside
    the nucleus of mass ``top_p`` (keeping at least ``min_tokens_to_keep``)."""
    if top_k > 0:
        kth = torch.topk(logits, min(max(top_k, min_tokens_to_keep), logits.size(-1)))[0][..., -1, None]
        logits = logits.masked_fill(logits < kth, filter_value)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., :min_tokens_to_keep] = False
        logits = logits.masked_fill(remove.scatter(1, order, remove), filter_value)
    return logits


def instantiate_from_config(config: dict[str, Any]) -> Any:
    """``target(**params)``, what ``taming.main.instantiate_from_config`` does with a config section."""
    module, name = config["target"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**config.get("params", {}))


def import_reference() -> types.SimpleNamespace:
    """The reference modules, with the stand-ins described in the module docstring."""
    if "transformers" not in sys.modules:
        sys.modules["transformers"] = types.SimpleNamespace(top_k_top_p_filtering=top_k_top_p_filtering)
    lightning = {"pytorch_lightning": types.SimpleNamespace(LightningModule=nn.Module),
                 "taming.main": types.SimpleNamespace(instantiate_from_config=instantiate_from_config)}
    installed = {name: module for name, module in lightning.items() if name not in sys.modules}
    sys.modules.update(installed)
    try:  # the stand-ins are needed while the module is imported only; they must not look installed afterwards
        import taming.models.cond_transformer as cond_transformer
    finally:
        for name in installed:
            sys.modules.pop(name, None)
    import taming.modules.losses.lpips as lpips
    import taming.modules.losses.vqperceptual as vqperceptual
    import taming.modules.transformer.mingpt as mingpt
    from taming.modules.diffusionmodules.model import Decoder, Encoder
    from taming.modules.vqvae.quantize import VectorQuantizer2

    vgg16 = lpips.models.vgg16
    lpips.models.vgg16 = lambda pretrained=False, **kwargs: vgg16(weights=None)
    lpips.LPIPS.load_from_pretrained = lambda self, name="vgg_lpips": None
    return types.SimpleNamespace(Encoder=Encoder, Decoder=Decoder, VectorQuantizer=VectorQuantizer2,
                                 Loss=vqperceptual.VQLPIPSWithDiscriminator, mingpt=mingpt,
                                 Net2NetTransformer=cond_transformer.Net2NetTransformer)


class TamingVQModel(nn.Module):
    """Taming's ``VQModel`` (encoder, quant_conv, quantize, post_quant_conv, decoder, loss) from its modules;
    the class itself imports Lightning."""

    def __init__(self, ref: types.SimpleNamespace, cfg: Stage1Config) -> None:
        super().__init__()
        m = cfg.model
        ddconfig = dict(double_z=False, z_channels=m.z_channels, resolution=cfg.data.image_size,
                        in_channels=cfg.data.channels, out_ch=cfg.data.channels, ch=m.ch, ch_mult=list(m.ch_mult),
                        num_res_blocks=m.num_res_blocks, attn_resolutions=list(m.attn_resolutions), dropout=m.dropout)
        self.encoder, self.decoder = ref.Encoder(**ddconfig), ref.Decoder(**ddconfig)
        self.quantize = ref.VectorQuantizer(m.codebook_size, m.embed_dim, beta=m.beta)
        self.quant_conv = nn.Conv2d(m.z_channels, m.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(m.embed_dim, m.z_channels, 1)
        self.loss = ref.Loss(disc_start=cfg.loss.disc_start, codebook_weight=cfg.loss.codebook_weight,
                             pixelloss_weight=cfg.loss.rec_weight, disc_num_layers=cfg.disc.n_layers,
                             disc_in_channels=cfg.data.channels, disc_weight=cfg.loss.disc_weight,
                             perceptual_weight=cfg.loss.perceptual_weight, disc_ndf=cfg.disc.ndf,
                             disc_loss=cfg.loss.disc_loss)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        quant, codebook_loss, _ = self.quantize(self.quant_conv(self.encoder(x)))
        return self.decoder(self.post_quant_conv(quant)), codebook_loss


def taming_stage1_step(model: TamingVQModel, optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer],
                       images: torch.Tensor, step: int) -> None:
    """One step as Lightning runs taming's ``training_step``: per optimizer, zero, forward, loss, backward, step."""
    last_layer = model.decoder.conv_out.weight
    for optimizer_idx, optimizer in enumerate(optimizers):
        optimizer.zero_grad(set_to_none=True)
        reconstructions, codebook_loss = model(images)
        loss, _ = model.loss(codebook_loss, images, reconstructions, optimizer_idx, step, last_layer=last_layer,
                             split="train")
        loss.backward()
        optimizer.step()


def compare_stage1(ref: types.SimpleNamespace, case: Stage1Case, device: torch.device, precision: str, *,
                   reps: int, warmup: int) -> dict[str, Any]:
    """Images/s of the two stage-1 steps; ours at ``precision`` (taming has no mixed precision)."""
    cfg = load_config(Stage1Config, case.config, [*case.overrides, "loss.perceptual_weight=0.0",
                                                  "loss.disc_start=0", "loss.disc_warmup_steps=0"])
    torch.manual_seed(0)
    model, disc, loss_fn = build_stage1(cfg)
    for module in (model, disc, loss_fn):
        module.to(device).train()
    betas, lr = cfg.train.betas, cfg.train.lr
    opt_ae, opt_disc = (make_adam(m.parameters(), lr, betas, 0.0, device) for m in (model, disc))
    taming = TamingVQModel(ref, cfg).to(device).train()
    ae_params = [p for name, p in taming.named_parameters() if not name.startswith("loss.")]
    taming_opts = (torch.optim.Adam(ae_params, lr=lr, betas=betas),
                   torch.optim.Adam(taming.loss.discriminator.parameters(), lr=lr, betas=betas))
    size, channels = cfg.data.image_size, cfg.data.channels
    images = (torch.rand(case.batch, channels, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    images = images.to(device)
    amp_dtype = autocast_dtype(device, precision)
    variants: dict[str, Callable[[], object]] = {
        "this repository": lambda: stage1_step(model, disc, loss_fn, opt_ae, opt_disc, [images], 0,
                                               grad_clip=cfg.train.grad_clip, amp_dtype=amp_dtype),
        "taming": lambda: taming_stage1_step(taming, taming_opts, images, 0),
    }
    timings, conv_peak = time_with_ceiling(variants, conv_ceiling(device), device, reps=reps, warmup=warmup)
    flops = {name: count_flops(fn) for name, fn in variants.items()}
    label = "fp32" if amp_dtype is None else "bf16 autocast (ours)"
    extra = {"precision": label, "target": f"stage1/{case.name}/{precision}", "conv_ceiling_gflop_per_s": conv_peak}
    if device.type == "cpu":
        extra["convolutions"] = {name: convolution_share(fn) for name, fn in variants.items()}
    return record(f"vs_taming/stage1/{case.name}/{precision}",
                  f"stage-1 step {case.name} {size}px b{case.batch}, GAN on, {label}", "img/s", case.batch, timings,
                  flops=flops, extra=extra)


def _taming_gpt(ref: types.SimpleNamespace, case: GPTCase, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return ref.mingpt.GPT(case.codebook_size + 1, max(case.seq_len, case.sample_tokens) + 1, n_layer=case.n_layer,
                          n_head=case.n_head, n_embd=case.n_embd).to(device)


def compare_sampling(ref: types.SimpleNamespace, case: GPTCase, device: torch.device, top_k: int, *, reps: int,
                     warmup: int) -> dict[str, Any]:
    """Tokens/s of ``sample_with_past`` against :func:`sample_tokens`, same GPT size, batch and top-k."""
    ours, theirs = case.build(device).eval(), _taming_gpt(ref, case, device).eval()
    prefix = torch.full((case.sample_batch, 1), case.codebook_size, dtype=torch.long, device=device)

    def sample_ours() -> torch.Tensor:
        return sample_tokens(ours, prefix, case.sample_tokens, top_k=top_k,
                             generator=torch.Generator(device).manual_seed(0))

    @torch.no_grad()
    def sample_theirs() -> torch.Tensor:
        return ref.mingpt.sample_with_past(prefix, theirs, case.sample_tokens, top_k=top_k)

    timings, gemm_peak = time_with_ceiling({"this repository": sample_ours, "taming": sample_theirs},
                                           gemm_ceiling(device), device, reps=reps, warmup=warmup)
    per_token = decode_gflop_per_token(case, device)
    return record(f"vs_taming/sampling/{case.name}",
                  f"sampling GPT {case.name} {case.sample_tokens} tok b{case.sample_batch} top-k {top_k}", "tok/s",
                  case.sample_batch * case.sample_tokens, timings,
                  extra={"target": "sampling", "gemm_ceiling_gflop_per_s": gemm_peak,
                         "decode_gflop_per_token": per_token, "ceiling_tok_per_s": gemm_peak / per_token})


def compare_gpt_training(ref: types.SimpleNamespace, case: GPTCase, device: torch.device, precision: str, *,
                         reps: int, warmup: int) -> dict[str, Any]:
    """Tokens/s of a GPT training step: taming's mingpt with AdamW against :func:`stage2_step`."""
    train = training_settings()
    prior = case.build_prior(device).train()
    optimizer = make_adam(prior.param_groups(train.weight_decay), train.lr, train.betas, 0.0, device)
    theirs = _taming_gpt(ref, case, device).train()
    their_optimizer = torch.optim.AdamW(theirs.parameters(), lr=train.lr, betas=train.betas,
                                        weight_decay=train.weight_decay)
    generator = torch.Generator().manual_seed(0)
    indices = torch.randint(case.codebook_size, (case.train_batch, case.seq_len), generator=generator).to(device)
    inputs = torch.cat([torch.full_like(indices[:, :1], case.codebook_size), indices[:, :-1]], dim=1)
    amp_dtype = autocast_dtype(device, precision)

    def step_theirs() -> None:
        their_optimizer.zero_grad(set_to_none=True)
        _, loss = theirs(inputs, targets=indices)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(theirs.parameters(), train.grad_clip)
        their_optimizer.step()

    variants = {"this repository": lambda: stage2_step(prior, optimizer, [(indices, None)], grad_clip=train.grad_clip,
                                                       amp_dtype=amp_dtype),
                "taming": step_theirs}
    timings = time_alternating(variants, device, reps=reps, warmup=warmup)
    label = "fp32" if amp_dtype is None else "bf16 autocast (ours)"
    return record(f"vs_taming/stage2_train/{case.name}/{precision}",
                  f"GPT training step {case.name} b{case.train_batch} x {case.seq_len} tok, {label}", "tok/s",
                  case.train_batch * case.seq_len, timings,
                  extra={"precision": label, "target": f"stage2_train/{precision}"})


@dataclass
class Ceiling:
    """Variants that each run one large fp32 kernel of the same FLOPs; the fastest gives the ceiling.

    They are timed in the same alternation as the work they bound, so that both see the same state of
    a shared machine, whose speed can drift by a third between minutes.
    """

    variants: dict[str, Callable[[], object]]
    flops: int

    def gflop_per_s(self, timings: dict[str, Timing]) -> float:
        return self.flops / min(timings[name].median for name in self.variants) / 1e9


def gemm_ceiling(device: torch.device, size: int = 1024) -> Ceiling:
    """A ``size``-cubed fp32 product through ``torch.mm``."""
    a, b = (torch.randn(size, size, device=device) for _ in range(2))
    return Ceiling({"ceiling: torch.mm": lambda: a @ b}, 2 * size**3)


def conv_ceiling(device: torch.device) -> Ceiling:
    """A large fp32 3x3 convolution (32 x 128 x 32 x 32, 128 filters), contiguous and ``channels_last``."""
    x = torch.randn(32, 128, 32, 32, device=device)
    weight = torch.randn(128, 128, 3, 3, device=device)
    variants: dict[str, Callable[[], object]] = {}
    for name, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
        a, w = x.to(memory_format=fmt), weight.to(memory_format=fmt)
        variants[f"ceiling: conv {name}"] = lambda a=a, w=w: torch.nn.functional.conv2d(a, w, padding=1)
    return Ceiling(variants, 2 * x.numel() * weight[0].numel())


def time_with_ceiling(variants: dict[str, Callable[[], object]], ceiling: Ceiling, device: torch.device, *,
                      reps: int, warmup: int) -> tuple[dict[str, Timing], float]:
    """Timings of ``variants`` and the ceiling's GFLOP/s, all timed in one alternation."""
    timings = time_alternating({**variants, **ceiling.variants}, device, reps=reps, warmup=warmup)
    return {name: timings[name] for name in variants}, ceiling.gflop_per_s(timings)


def decode_gflop_per_token(case: GPTCase, device: torch.device) -> float:
    """FLOPs of one cached decoding step of the case's GPT, per sequence (attention over a full cache)."""
    gpt = case.build(device).eval()
    cache = gpt.new_cache(case.sample_batch)
    token = torch.zeros(case.sample_batch, 1, dtype=torch.long, device=device)
    with torch.no_grad():
        for _ in range(case.sample_tokens - 1):
            gpt.forward_with_cache(token, cache)
        flops = count_flops(lambda: gpt.forward_with_cache(token, cache))
    return flops / case.sample_batch / 1e9


@dataclass(frozen=True)
class Comparison:
    """What the side-by-side part of a benchmark scale runs."""

    stage1: tuple[Stage1Case, ...]
    gpt: GPTCase
    top_k: int
    reps: int
    warmup: int


CONFIGS = Path(__file__).resolve().parent.parent / "configs"
FASHION_SMALL, F16 = str(CONFIGS / "fashion_mnist_small.yaml"), str(CONFIGS / "imagenet_f16.yaml")
GPT_8x256 = GPTCase(n_layer=8, n_head=8, n_embd=256, codebook_size=512, seq_len=64, train_batch=16, sample_batch=16,
                    sample_tokens=64)
# The reference's GroupNorm needs widths divisible by 32.
TINY_MODEL = ("model.ch=32", "model.ch_mult=[1,2]", "model.attn_resolutions=[8]", "model.z_channels=32",
              "model.embed_dim=8", "model.codebook_size=16", "disc.ndf=8", "disc.n_layers=2", "data.image_size=16")
COMPARISONS = {
    "full": Comparison(stage1=(Stage1Case("fashion_mnist_small", FASHION_SMALL, (), 32),
                               Stage1Case("f16-64", F16, ("data.image_size=64",), 8)),
                       gpt=GPT_8x256, top_k=100, reps=7, warmup=1),
    "quick": Comparison(stage1=(Stage1Case("fashion_mnist_small", FASHION_SMALL, (), 32),),
                        gpt=GPT_8x256, top_k=100, reps=2, warmup=1),
    "tiny": Comparison(stage1=(Stage1Case("fashion_mnist_small", FASHION_SMALL, TINY_MODEL, 2),),
                       gpt=GPTCase(n_layer=2, n_head=2, n_embd=32, codebook_size=16, seq_len=16, train_batch=2,
                                   sample_batch=4, sample_tokens=16), top_k=8, reps=1, warmup=1),
}


def run_comparison(scale: Comparison, device: torch.device, keep: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Every side-by-side benchmark of ``scale`` (results passed to ``keep``); returns the ceilings measured
    beside them (the highest convolution ceiling of the stage-1 cases, the GEMM ceiling of sampling)."""
    ref = import_reference()
    stage1 = []
    for case in scale.stage1:
        for precision in ("fp32", "bf16"):
            stage1.append(compare_stage1(ref, case, device, precision, reps=scale.reps, warmup=scale.warmup))
            keep(stage1[-1])
    sampling = compare_sampling(ref, scale.gpt, device, scale.top_k, reps=scale.reps, warmup=scale.warmup)
    keep(sampling)
    for precision in ("fp32", "bf16"):
        keep(compare_gpt_training(ref, scale.gpt, device, precision, reps=scale.reps, warmup=scale.warmup))
    return {"conv_peak_gflop_per_s": max(r["conv_ceiling_gflop_per_s"] for r in stage1),
            "gemm_peak_gflop_per_s": sampling["gemm_ceiling_gflop_per_s"],
            "decode_gflop_per_token": sampling["decode_gflop_per_token"],
            "sampling_ceiling_tok_per_s": sampling["ceiling_tok_per_s"]}


def vs_taming_targets(results: list[dict[str, Any]], ceiling: dict[str, Any] | None,
                       at_target: bool) -> list[dict[str, Any]]:
    """The speed-ups over the reference that this repository aims for, and the stage-1 steps and sampling
    against the ceilings timed beside them; none where the comparison was skipped (``ceiling`` None)."""
    if ceiling is None:
        return []
    targets = []
    for result in results:
        need = VS_TAMING_TARGETS.get(result.get("target", ""))
        if need is not None:
            targets.append({"name": f"{result['title']}: this repository over taming", "value": result["speedup"],
                            "need": need, "met": result["speedup"] >= need, "at_target_size": at_target})
    for result in (r for r in results if r.get("target", "").startswith("stage1/") and r["precision"] == "fp32"):
        ours, peak = result["variants"]["this repository"], result["conv_ceiling_gflop_per_s"]
        fraction = ours["gflop_per_s"] / peak
        inside = ""
        if "convolutions" in result:
            conv = result["convolutions"]["this repository"]
            inside = (f"; its convolutions take {conv['convolution_time_share']:.0%} of its time and run at "
                      f"{conv['convolution_gflop_per_s'] / peak:.0%} of the ceiling")
        targets.append({"name": f"{result['title']}: fraction of the 3x3 convolution ceiling "
                                f"({peak:.0f} GFLOP/s; ours "
                                f"{ours['gflop_per_item']:.2f} GFLOP/img, taming "
                                f"{result['variants']['taming']['gflop_per_item']:.2f}{inside})",
                        "value": fraction, "need": CONV_PEAK_FRACTION, "met": fraction >= CONV_PEAK_FRACTION,
                        "at_target_size": at_target})
    for result in (r for r in results if r.get("target") == "sampling"):
        fraction = result["variants"]["this repository"]["per_s"] / result["ceiling_tok_per_s"]
        targets.append({"name": f"{result['title']}: fraction of the arithmetic ceiling "
                                f"({result['ceiling_tok_per_s']:.0f} tok/s)",
                        "value": fraction, "need": round(CEILING_FRACTION, 2), "met": fraction >= CEILING_FRACTION,
                        "at_target_size": at_target})
    return targets


def reference_benchmark_args(description: str,
                             argv: list[str] | None) -> tuple[argparse.Namespace, str, torch.device] | None:
    """A side-by-side benchmark's (arguments, mode, device), or None, after saying why, where taming-transformers is
    not installed."""
    parsed = parse_benchmark_args(benchmark_parser(description), argv)
    if not reference_available():
        print(f"skipped: taming-transformers is not installed ({INSTALL_HINT})")
        return None
    return parsed


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Only the side-by-side part: ``python -m benchmarks.taming_compare [--quick] [--out FILE]``."""
    parsed = reference_benchmark_args(__doc__, argv)
    if parsed is None:
        return None
    args, mode, device = parsed
    results: list[dict[str, Any]] = []
    ceiling = run_comparison(COMPARISONS[mode], device, results.append)
    report = {"meta": {"mode": mode, "device": str(device), "threads": torch.get_num_threads(),
                       "torch": torch.__version__, **ceiling},
              "results": results, "targets": vs_taming_targets(results, ceiling, mode == "full")}
    print(f"This repository against taming-transformers ({mode}) on {device}, {torch.get_num_threads()} threads")
    print_and_save(report, [f"GEMM ceiling {ceiling['gemm_peak_gflop_per_s']:.0f} GFLOP/s, 3x3 convolution ceiling "
                            f"{ceiling['conv_peak_gflop_per_s']:.0f} GFLOP/s, "
                            f"{ceiling['decode_gflop_per_token'] * 1e3:.1f} MFLOP per decoded token"], args.out)
    return report


if __name__ == "__main__":
    main()

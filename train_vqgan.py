"""Stage 1: train a VQGAN from a YAML config.

    python train_vqgan.py --config configs/quickstart.yaml [--run-dir DIR] [--resume] [key=value ...]
    torchrun --nproc_per_node=N train_vqgan.py --config ...
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

from dataloader import DataError, build_dataset, build_loader, infinite_batches
from pipeline.builders import build_models
from pipeline.init_from import init_from_checkpoint
from utils.checkpoint import (
    load_state_dict_checked,
    save_checkpoint,
    set_rng_state,
    training_checkpoint,
)
from utils.config import Stage1Config, load_config, save_config, to_dict
from utils.distributed import DistInfo, init_distributed, shutdown_distributed, unwrap, wrap_ddp
from utils.logging import MetricsLogger
from utils.plots import plot_training_curves, save_reconstruction_grid
from utils.trainer import (
    LoopSettings,
    ModelEMA,
    TensorSnapshot,
    autocast,
    autocast_dtype,
    clean_exit,
    configure_backends,
    count_parameters,
    default_run_dir,
    describe_environment,
    device_type_of,
    finish_message,
    first_nonfinite,
    lr_factor,
    make_adam,
    prepare_run,
    resolve_device,
    run_loop,
    set_lr,
    set_seed,
    training_parser,
)
from vqgan import VQGAN, Discriminator, VQGANLoss
from vqgan.lpips import LPIPSWeightsError, LPIPSWeightsMismatchError

KIND = "vqgan"
METRIC_COLUMNS = ["lr", "total", "rec_loss", "p_loss", "codebook_loss", "g_loss", "d_weight", "gan_factor",
                  "d_loss", "logits_real", "logits_fake", "usage", "perplexity", "grad_norm", "items_per_s",
                  "bad_steps"]
PLOT_GROUPS = {
    "losses": ["total", "rec_loss", "p_loss", "codebook_loss"],
    "gan": ["g_loss", "d_loss", "d_weight", "logits_real", "logits_fake"],
    "codebook": ["usage", "perplexity"],
}


def summary(model: VQGAN, disc: Discriminator, loss: VQGANLoss, dataset_size: int, env: str,
            run_dir: Path, cfg: Stage1Config) -> str:
    parts = {"encoder": model.encoder, "decoder": model.decoder, "quantizer": model.quantizer,
             "discriminator": disc}
    lines = ["VQGAN stage 1", f"  run folder   {run_dir}", f"  device       {env}",
             f"  data         {cfg.data.name} ({dataset_size} train images, {cfg.data.image_size}px, "
             f"{cfg.data.channels} ch)",
             f"  tokens       {model.latent_size[0]}x{model.latent_size[1]} from {model.codebook_size} codes"]
    lines += [f"  {name:<12} {count_parameters(module) / 1e6:.2f}M params" for name, module in parts.items()]
    lines.append(f"  perceptual   {'LPIPS weight ' + str(cfg.loss.perceptual_weight) if loss.lpips else 'off'}")
    lines.append(f"  steps        {cfg.train.max_steps} x batch {cfg.train.batch_size} x accum {cfg.train.grad_accum}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    with clean_exit(DataError, LPIPSWeightsError, LPIPSWeightsMismatchError):
        args = training_parser(__doc__).parse_args(argv)
        cfg = load_config(Stage1Config, args.config, args.overrides)
        for warning in cfg.validate():
            print(f"warning: {warning}", file=sys.stderr)
        info = init_distributed(device_type_of(cfg.train.device))
        try:
            train(cfg, default_run_dir(args.config, args.run_dir), args, info)
        finally:
            shutdown_distributed()


def train(cfg: Stage1Config, run_dir: Path, args: argparse.Namespace, info: DistInfo) -> None:
    device = resolve_device(cfg.train.device, info)
    configure_backends(device)
    config_dict = to_dict(cfg)
    resume_state = prepare_run(run_dir, config_dict, resume=args.resume, force=args.force, kind=KIND, info=info)
    set_seed(cfg.train.seed)  # the same initial weights and codebook buffers on every rank
    train_set = build_dataset(cfg.data, "train")
    eval_set = build_dataset(cfg.data, "test")
    model, disc, loss_fn = build_models(cfg)
    if cfg.train.init_from and resume_state is None:  # a new run from trained weights; --resume ignores it
        init_from_checkpoint(cfg.train.init_from, model, disc, cfg, verbose=info.is_main)
    set_seed(cfg.train.seed + info.rank)
    start_step = 0
    ema = None
    channels_last = cfg.train.channels_last and device.type == "cuda"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    disc.to(device, memory_format=memory_format)
    loss_fn.to(device)
    disc_lr = cfg.train.disc_lr or cfg.train.lr
    opt_ae = make_adam(model.parameters(), cfg.train.lr, cfg.train.betas, cfg.train.weight_decay, device)
    opt_d = make_adam(disc.parameters(), disc_lr, cfg.train.betas, cfg.train.weight_decay, device)

    if resume_state is not None:
        source = f"{run_dir / 'checkpoints' / 'last.pt'}"
        load_state_dict_checked(model, resume_state["model"], source)
        load_state_dict_checked(disc, resume_state["disc"], source)
        opt_ae.load_state_dict(resume_state["opt_ae"])
        opt_d.load_state_dict(resume_state["opt_disc"])
        loss_fn.load_training_state(resume_state["loss_state"])
        set_rng_state(resume_state["rng"])
        start_step = resume_state["step"]
    if cfg.train.ema_decay > 0:  # starts from the resumed weights when the checkpoint has no EMA yet
        ema = ModelEMA(model, cfg.train.ema_decay)
        if resume_state is not None and resume_state.get("ema") is not None:
            ema.load_state_dict(resume_state["ema"])

    if info.is_main:
        save_config(cfg, run_dir / "config.yaml")
        print(summary(model, disc, loss_fn, len(train_set), describe_environment(device, info), run_dir, cfg))
        if start_step:
            print(f"  resumed at   step {start_step}")

    train_model = wrap_ddp(model, info, device, sync_buffers_every_step=False)  # the quantizer syncs its own
    train_disc = wrap_ddp(disc, info, device)
    if cfg.train.compile:
        train_model = torch.compile(train_model)
        train_disc = torch.compile(train_disc)

    loader = build_loader(train_set, cfg.train.batch_size, shuffle=True, num_workers=cfg.data.num_workers,
                          device_type=device.type, seed=cfg.train.seed, distributed=info.enabled)
    batches = infinite_batches(loader, start_step=start_step * cfg.train.grad_accum)
    sample_count = min(cfg.train.num_sample_images, len(eval_set))
    sample_inputs = torch.stack([eval_set[i][0] for i in range(sample_count)]).to(device)
    amp_dtype = autocast_dtype(device, cfg.train.precision)
    checkpoint_dir = run_dir / "checkpoints"
    logger = MetricsLogger(run_dir, METRIC_COLUMNS, resume_step=start_step if start_step else None) \
        if info.is_main else None
    forward_state = TensorSnapshot([*model.quantizer.parameters(), *model.buffers(), *disc.buffers(),
                                    *loss_fn.buffers()])

    def train_step(step: int) -> dict[str, float]:
        factor = lr_factor(step, cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.lr_schedule,
                           cfg.train.min_lr_ratio)
        set_lr(opt_ae, cfg.train.lr * factor)
        set_lr(opt_d, disc_lr * factor)
        opt_ae.zero_grad(set_to_none=True)
        opt_d.zero_grad(set_to_none=True)
        disc_active = loss_fn.gan_factor(step) > 0
        forward_state.take()
        totals: dict[str, float] = {}
        for micro in range(cfg.train.grad_accum):
            images = next(batches)[0].to(device, non_blocking=True, memory_format=memory_format)
            last_micro = micro == cfg.train.grad_accum - 1
            with _sync(train_model, last_micro), autocast(device, amp_dtype):
                out = train_model(images)
                logs = loss_fn.generator_backward(images, out.reconstruction, out.codebook_loss, unwrap(train_disc),
                                                  model.last_layer, step, scale=1 / cfg.train.grad_accum)
            if disc_active:
                with _sync(train_disc, last_micro), autocast(device, amp_dtype):
                    d_loss, d_logs = loss_fn.discriminator_loss(images, out.reconstruction.detach(), train_disc, step)
                (d_loss / cfg.train.grad_accum).backward()
                logs.update(d_logs)
            for key, value in logs.items():
                totals[key] = totals.get(key, 0.0) + value / cfg.train.grad_accum
        grad_norm = _clip(model, cfg.train.grad_clip)
        disc_norm = _clip(disc, cfg.train.grad_clip)
        bad = first_nonfinite(totals)
        if bad is None and not torch.isfinite(grad_norm):
            bad = "autoencoder gradient"
        if bad is None and not torch.isfinite(disc_norm):
            bad = "discriminator gradient"
        if bad is not None:
            opt_ae.zero_grad(set_to_none=True)
            opt_d.zero_grad(set_to_none=True)
            forward_state.restore()
            return {"nonfinite": bad}
        opt_ae.step()
        if disc_active:
            opt_d.step()
        if ema is not None:
            ema.update(model)
        totals.update(lr=cfg.train.lr * factor, grad_norm=float(grad_norm),
                      usage=model.quantizer.codebook_usage(), perplexity=model.quantizer.window_perplexity())
        return totals

    def save(step: int, periodic: bool) -> None:
        if not info.is_main:
            return
        state = training_checkpoint(
            KIND, step, config_dict, model=model.state_dict(), model_config=model.config, disc=disc.state_dict(),
            ema=ema.state_dict() if ema is not None else None, opt_ae=opt_ae.state_dict(),
            opt_disc=opt_d.state_dict(), loss_state=loss_fn.training_state())
        save_checkpoint(state, checkpoint_dir / "last.pt")
        if periodic:
            save_checkpoint(state, checkpoint_dir / f"step_{step:06d}.pt")

    def log(step: int, values: dict[str, float]) -> None:
        if logger is not None:
            logger.log(step, {k: v for k, v in values.items() if k in METRIC_COLUMNS})

    def sample(step: int) -> None:
        if not info.is_main:
            return
        net = ema.module if ema is not None else model
        was_training = net.training
        net.eval()
        with torch.no_grad(), autocast(device, amp_dtype):
            recon = net(sample_inputs).reconstruction
        net.train(was_training)
        save_reconstruction_grid(sample_inputs, recon, run_dir / "samples" / f"step_{step:06d}.png")
        plot_training_curves(run_dir / "metrics.csv", run_dir / "plots", PLOT_GROUPS)

    settings = LoopSettings(start_step=start_step, max_steps=cfg.train.max_steps, log_every=cfg.train.log_every,
                            sample_every=cfg.train.sample_every, ckpt_every=cfg.train.ckpt_every,
                            max_bad_steps=cfg.train.max_bad_steps, desc="stage 1", checkpoint_dir=checkpoint_dir,
                            postfix_keys=("rec_loss", "usage", "items_per_s"))
    model.train()
    disc.train()
    started = time.perf_counter()
    try:
        step = run_loop(settings, info, device, train_step=train_step, save=save, log=log, sample=sample,
                        items_per_step=cfg.train.batch_size * cfg.train.grad_accum * info.world_size)
        seconds = time.perf_counter() - started
        if info.is_main and step > start_step:
            sample(step)
            print(finish_message(step - start_step, seconds, device, checkpoint_dir / "last.pt"))
    finally:
        if logger is not None:
            logger.close()


def _sync(module: torch.nn.Module, last_micro: bool) -> contextlib.AbstractContextManager:
    """Skip the DDP gradient all-reduce on all but the last micro-batch of a step."""
    if not last_micro and hasattr(module, "no_sync"):
        return module.no_sync()
    return contextlib.nullcontext()


def _clip(module: torch.nn.Module, max_norm: float) -> torch.Tensor:
    params = [p for p in module.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(())
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))


if __name__ == "__main__":
    main()

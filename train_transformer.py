"""Stage 2: train a GPT prior over the codes of a trained VQGAN.

    python train_transformer.py --config configs/quickstart_transformer.yaml \\
        --vqgan runs/quickstart/checkpoints/last.pt [--run-dir DIR] [--resume] [key=value ...]

The training images are tokenised once by the frozen VQGAN and cached in ``.cache/tokens/``
(keyed by the stage-1 checkpoint and the data config); training then reads only the cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from dataloader import DataError, build_loader, infinite_batches
from pipeline.loading import load_vqgan
from pipeline.tokens import tokenize_dataset
from transformer import VQGANPrior
from utils.checkpoint import (
    load_state_dict_checked,
    save_checkpoint,
    set_rng_state,
    training_checkpoint,
)
from utils.config import ConfigError, Stage2Config, load_config, save_config, to_dict
from utils.distributed import DistInfo, barrier, init_distributed, shutdown_distributed, wrap_ddp
from utils.logging import MetricsLogger
from utils.plots import plot_training_curves, save_grid
from utils.trainer import (
    LoopSettings,
    RunDirError,
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

KIND = "transformer"
METRIC_COLUMNS = ["lr", "loss", "bits_per_token", "grad_norm", "items_per_s", "bad_steps"]
PLOT_GROUPS = {"prior": ["loss", "bits_per_token", "lr"]}
TOKEN_CACHE = Path(".cache") / "tokens"


def main(argv: list[str] | None = None) -> None:
    with clean_exit(DataError):
        parser = training_parser(__doc__)
        parser.add_argument("--vqgan", required=True, help="stage-1 checkpoint (runs/<name>/checkpoints/last.pt)")
        args = parser.parse_args(argv)
        cfg = load_config(Stage2Config, args.config, args.overrides)
        for warning in cfg.validate():
            print(f"warning: {warning}", file=sys.stderr)
        info = init_distributed(device_type_of(cfg.train.device))
        try:
            train(cfg, default_run_dir(args.config, args.run_dir), args, info)
        finally:
            shutdown_distributed()


def train(cfg: Stage2Config, run_dir: Path, args: argparse.Namespace, info: DistInfo) -> None:
    device = resolve_device(cfg.train.device, info)
    configure_backends(device)
    config_dict = to_dict(cfg)
    resume_state = prepare_run(run_dir, config_dict, resume=args.resume, force=args.force, kind=KIND, info=info)
    vqgan, vqgan_state = load_vqgan(args.vqgan, device)
    check_stage1_matches(cfg, vqgan_state, args.vqgan)
    if resume_state is not None and not args.force:
        check_same_vqgan(resume_state, vqgan_state, args.vqgan)
    tokens = None
    if info.is_main:
        tokens = tokenize_dataset(vqgan, cfg.data, args.vqgan, TOKEN_CACHE, device)
    barrier()
    if tokens is None:
        tokens = tokenize_dataset(vqgan, cfg.data, args.vqgan, TOKEN_CACHE, device)
    indices, labels = tokens["indices"].long(), tokens["labels"].long()
    num_classes = int(tokens["num_classes"])
    if cfg.transformer.class_conditional and num_classes < 2:
        raise ConfigError(f"transformer.class_conditional=true but the dataset '{cfg.data.name}' has no class "
                          f"labels. Set transformer.class_conditional=false (or data.class_labels=true for a "
                          f"folder with one subfolder per class).")

    set_seed(cfg.train.seed)  # the same initial weights on every rank
    prior = VQGANPrior(vqgan, **dataclasses.asdict(cfg.transformer),
                       num_classes=num_classes if cfg.transformer.class_conditional else 0).to(device)
    set_seed(cfg.train.seed + info.rank)
    optimizer = make_adam(prior.param_groups(cfg.train.weight_decay), cfg.train.lr, cfg.train.betas, 0.0, device)
    start_step = 0
    if resume_state is not None:
        load_state_dict_checked(prior.gpt, resume_state["model"], str(run_dir / "checkpoints" / "last.pt"))
        optimizer.load_state_dict(resume_state["optimizer"])
        set_rng_state(resume_state["rng"])
        start_step = resume_state["step"]

    if info.is_main:
        save_config(cfg, run_dir / "config.yaml")
        h, w = prior.latent_size
        print("\n".join([
            "GPT prior (stage 2)", f"  run folder   {run_dir}",
            f"  device       {describe_environment(device, info)}",
            f"  stage 1      {args.vqgan} ({prior.codebook_size} codes, {h}x{w} tokens)",
            f"  data         {len(indices)} token sequences, {num_classes} classes",
            f"  gpt          {count_parameters(prior.gpt) / 1e6:.2f}M params, {cfg.transformer.n_layer} layers",
            f"  steps        {cfg.train.max_steps} x batch {cfg.train.batch_size}"
            + (f" (resumed at {start_step})" if start_step else "")]))

    train_prior = wrap_ddp(prior, info, device)
    if cfg.train.compile:
        train_prior = torch.compile(train_prior)
    loader = build_loader(TensorDataset(indices, labels), cfg.train.batch_size, shuffle=True,
                          device_type=device.type, seed=cfg.train.seed, distributed=info.enabled)
    batches = infinite_batches(loader, start_step=start_step * cfg.train.grad_accum)
    amp_dtype = autocast_dtype(device, cfg.train.precision)
    checkpoint_dir = run_dir / "checkpoints"
    logger = MetricsLogger(run_dir, METRIC_COLUMNS, resume_step=start_step or None) if info.is_main else None
    sample_labels = torch.arange(cfg.train.num_sample_images) % num_classes \
        if prior.class_conditional else None

    def train_step(step: int) -> dict[str, float]:
        lr = cfg.train.lr * lr_factor(step, cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.lr_schedule,
                                      cfg.train.min_lr_ratio)
        set_lr(optimizer, lr)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(cfg.train.grad_accum):
            x, y = next(batches)
            x = x.to(device, non_blocking=True)
            y = y.to(device) if prior.class_conditional else None
            with autocast(device, amp_dtype):
                loss = train_prior(x, y)
            (loss / cfg.train.grad_accum).backward()
            total += loss.item() / cfg.train.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(prior.gpt.parameters(),
                                                   cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf)
        bad = first_nonfinite({"loss": total}) or (None if torch.isfinite(grad_norm) else "gradient")
        if bad is not None:
            optimizer.zero_grad(set_to_none=True)
            return {"nonfinite": bad}
        optimizer.step()
        return {"lr": lr, "loss": total, "bits_per_token": total / math.log(2), "grad_norm": float(grad_norm)}

    def save(step: int, periodic: bool) -> None:
        if not info.is_main:
            return
        state = training_checkpoint(KIND, step, config_dict, model=prior.gpt.state_dict(),
                                    prior_config=prior.config, vqgan=vqgan_state["model"],
                                    vqgan_config=vqgan_state["model_config"], optimizer=optimizer.state_dict())
        save_checkpoint(state, checkpoint_dir / "last.pt")
        if periodic:
            save_checkpoint(state, checkpoint_dir / f"step_{step:06d}.pt")

    def log(step: int, values: dict[str, float]) -> None:
        if logger is not None:
            logger.log(step, {k: v for k, v in values.items() if k in METRIC_COLUMNS})

    def sample(step: int) -> None:
        if not info.is_main:
            return
        prior.eval()
        generator = torch.Generator(device).manual_seed(cfg.train.seed)
        with autocast(device, amp_dtype):
            _, images = prior.sample(cfg.train.num_sample_images, sample_labels, temperature=cfg.sample.temperature,
                                     top_k=cfg.sample.top_k, top_p=cfg.sample.top_p,
                                     cfg_scale=cfg.sample.cfg_scale if prior.class_conditional else 1.0,
                                     generator=generator)
        prior.train()
        save_grid(images, run_dir / "samples" / f"step_{step:06d}.png", nrow=min(8, len(images)))
        plot_training_curves(run_dir / "metrics.csv", run_dir / "plots", PLOT_GROUPS)

    settings = LoopSettings(start_step=start_step, max_steps=cfg.train.max_steps, log_every=cfg.train.log_every,
                            sample_every=cfg.train.sample_every, ckpt_every=cfg.train.ckpt_every,
                            max_bad_steps=cfg.train.max_bad_steps, desc="stage 2", checkpoint_dir=checkpoint_dir,
                            postfix_keys=("loss", "items_per_s"))
    prior.train()
    started = time.perf_counter()
    try:
        step = run_loop(settings, info, device, train_step=train_step, save=save, log=log, sample=sample,
                        items_per_step=cfg.train.batch_size * cfg.train.grad_accum * prior.seq_len * info.world_size)
        seconds = time.perf_counter() - started
        if info.is_main and step > start_step:
            sample(step)
            print(finish_message(step - start_step, seconds, device, checkpoint_dir / "last.pt"))
    finally:
        if logger is not None:
            logger.close()


def check_stage1_matches(cfg: Stage2Config, vqgan_state: dict, vqgan_path: str) -> None:
    """The stage-1 model must have been trained on images of the size and channels ``cfg.data`` gives."""
    trained = vqgan_state["config"]["data"]
    for key in ("image_size", "channels"):
        if trained[key] != getattr(cfg.data, key):
            raise ConfigError(f"data.{key}={getattr(cfg.data, key)} but the stage-1 checkpoint {vqgan_path} was "
                              f"trained with data.{key}={trained[key]}. Use the data settings of the stage-1 run "
                              f"(its config.yaml), or pass the matching --vqgan checkpoint.")


def check_same_vqgan(resume_state: dict, vqgan_state: dict, vqgan_path: str) -> None:
    """Resuming must keep the stage-1 model the run started with (its codes are what the GPT learned)."""
    saved, given = resume_state["vqgan"], vqgan_state["model"]
    same = saved.keys() == given.keys() and all(torch.equal(saved[k], given[k].cpu()) for k in saved)
    if not same:
        raise RunDirError(f"--vqgan {vqgan_path} is not the stage-1 model this run was started with, so its codes "
                          f"differ from the ones the GPT learned. Pass the original stage-1 checkpoint, or add "
                          f"--force to continue with this one.")


if __name__ == "__main__":
    main()

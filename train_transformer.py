"""Stage 2: train a GPT prior over the codes of a trained VQGAN.

    python train_transformer.py --config configs/quickstart_transformer.yaml \\
        --vqgan runs/quickstart/checkpoints/last.pt [--run-dir DIR] [--resume] [key=value ...]

The training images are tokenised once by the frozen VQGAN and cached (keyed by the stage-1 checkpoint
and the data config); training then reads only the cache. The cache lives in ``--token-cache`` (default:
``$VQGAN_TOKEN_CACHE``, else ``$XDG_CACHE_HOME/vqgan/tokens``, else ``~/.cache/vqgan/tokens``): a
per-user folder that does not depend on the current directory, so every run of the same data reuses it.
Under torchrun the first process of each node fills its node's cache and the others read it, so nodes
need not share a disk. Then a loop calls :func:`transformer.training.stage2_step` once per optimizer
step and logs, samples, checkpoints and stops on a signal through the small helpers below.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset, TensorDataset

from dataloader import CheckedLoader, DataError, build_dataset, build_loader, infinite_batches, num_classes_of
from dataloader.folder import folder_fingerprint
from transformer import VQGANPrior
from transformer.config import Stage2Config
from transformer.token_cache import cache_key, tokenize_dataset
from transformer.training import stage2_step
from utils.checkpoint import (
    load_checkpoint,
    load_state_dict_checked,
    save_checkpoint,
    set_rng_state,
    training_checkpoint,
)
from utils.config import ConfigError, DataConfig, building, save_config, to_dict
from utils.device import autocast_dtype, configure_backends, describe_environment, resolve_device
from utils.distributed import DistInfo, on_every_rank, wrap_ddp
from utils.logging import TrainingLog
from utils.loop import BadStepTracker, StopSignal, check_replicas, is_due
from utils.pictures import class_rows, plot_training_curves, save_grid
from utils.run_dir import RunDirError, prepare_run
from utils.script import run_training, training_parser
from utils.training import ModelEMA, autocast, compile_module, count_parameters, lr_factor, make_adam, set_lr, set_seed
from vqgan import VQGAN

KIND = "transformer"
METRIC_COLUMNS = ["lr", "loss", "bits_per_token", "grad_norm", "items_per_s", "bad_steps"]
PLOT_GROUPS = {"prior": ["loss", "bits_per_token", "lr"]}


def default_token_cache() -> Path:
    """``$VQGAN_TOKEN_CACHE``, else ``$XDG_CACHE_HOME/vqgan/tokens``, else ``~/.cache/vqgan/tokens``."""
    if os.environ.get("VQGAN_TOKEN_CACHE"):
        return Path(os.environ["VQGAN_TOKEN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vqgan" / "tokens"


def main(argv: list[str] | None = None) -> None:
    parser = training_parser(__doc__, Stage2Config)
    parser.add_argument("--vqgan", required=True, help="stage-1 checkpoint (runs/<name>/checkpoints/last.pt)")
    parser.add_argument("--token-cache", default=None,
                        help="folder for the tokenised training set (default: $VQGAN_TOKEN_CACHE, else "
                             "$XDG_CACHE_HOME/vqgan/tokens, else ~/.cache/vqgan/tokens)")
    run_training(parser, Stage2Config, train, argv, user_errors=(DataError,))


def train(cfg: Stage2Config, run_dir: Path, args: argparse.Namespace, info: DistInfo) -> None:
    device = resolve_device(cfg.train.device, info)
    configure_backends(device)
    config_dict = to_dict(cfg)
    resume_state = prepare_run(run_dir, config_dict, resume=args.resume, force=args.force, kind=KIND, info=info)
    cache = Path(args.token_cache) if args.token_cache else default_token_cache()
    with on_every_rank(info):  # every node needs the stage-1 checkpoint and the data
        vqgan_state = load_checkpoint(args.vqgan, kind="vqgan")
        vqgan = VQGAN.from_checkpoint(vqgan_state, args.vqgan).to(device)
        check_stage1_matches(cfg, vqgan_state, args.vqgan)
        if resume_state is not None and not args.force:
            check_same_vqgan(resume_state, vqgan, args.vqgan)
        tokens = tokenize(vqgan, cfg, args.vqgan, device, cache) if info.local_rank == 0 else None
    if tokens is None:  # the node's first process has written the cache
        tokens = tokenize(vqgan, cfg, args.vqgan, device, cache)
    indices, labels = tokens["indices"].long(), tokens["labels"].long()
    num_classes = int(tokens["num_classes"])
    if cfg.transformer.class_conditional and num_classes < 2:
        raise ConfigError(f"transformer.class_conditional=true but the dataset '{cfg.data.name}' has no class "
                          f"labels. Set transformer.class_conditional=false (or data.class_labels=true for a "
                          f"folder with one subfolder per class).")

    set_seed(cfg.train.seed)  # the same initial weights on every rank
    with building("GPT prior"):
        prior = VQGANPrior(vqgan, cfg.transformer, num_classes if cfg.transformer.class_conditional else 0)
    prior.to(device)
    set_seed(cfg.train.seed + info.rank)
    optimizer = make_adam(prior.param_groups(cfg.train.weight_decay), cfg.train.lr, cfg.train.betas, 0.0, device)
    start_step = 0
    if resume_state is not None:
        load_state_dict_checked(prior.gpt, resume_state["model"], str(run_dir / "checkpoints" / "last.pt"))
        optimizer.load_state_dict(resume_state["optimizer"])
        set_rng_state(resume_state["rng"])
        start_step = resume_state["step"]
    # The EMA starts from the resumed weights when the checkpoint has none yet.
    ema = ModelEMA(prior.gpt, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    if ema is not None and resume_state is not None and resume_state.get("ema") is not None:
        ema.load_state_dict(resume_state["ema"])
    if info.is_main:
        save_config(cfg, run_dir / "config.yaml")
        print(summary(prior, len(indices), num_classes, describe_environment(device, info), run_dir, args.vqgan, cfg,
                      start_step))

    train_prior = wrap_ddp(prior, info, device)
    if cfg.train.compile:
        train_prior = compile_module(train_prior)
    loader = build_loader(TensorDataset(indices, labels), cfg.train.batch_size, shuffle=True,
                          device_type=device.type, seed=cfg.train.seed, distributed=info.enabled)
    batches = infinite_batches(loader, start_step=start_step * cfg.train.grad_accum)
    amp_dtype = autocast_dtype(device, cfg.train.precision)
    last_checkpoint = run_dir / "checkpoints" / "last.pt"
    log = TrainingLog(run_dir, METRIC_COLUMNS, start_step=start_step, max_steps=cfg.train.max_steps,
                      log_every=cfg.train.log_every, desc="stage 2", postfix_keys=("loss", "items_per_s"),
                      items_per_step=cfg.train.batch_size * cfg.train.grad_accum * prior.seq_len * info.world_size,
                      is_main=info.is_main, bad_steps=BadStepTracker(cfg.train.max_bad_steps, last_checkpoint))

    def checkpoint(step: int, now: bool = False) -> None:
        """``last.pt`` (and ``step_XXXXXX.pt``) every ``train.ckpt_every`` steps, after the last step, or ``now``."""
        periodic = is_due(step, cfg.train.ckpt_every) and not now
        if info.is_main and (now or periodic or step == cfg.train.max_steps):
            save(run_dir, step, periodic, config_dict, prior, optimizer, ema, vqgan_state)

    def samples(step: int) -> None:
        """A sample grid and plots every ``train.sample_every`` steps and after the last step."""
        if info.is_main and (is_due(step, cfg.train.sample_every) or step == cfg.train.max_steps):
            write_samples(run_dir, step, prior, ema, cfg, amp_dtype)

    prior.train()
    with StopSignal() as stop, log:
        for step in range(start_step + 1, cfg.train.max_steps + 1):  # counts steps done, from 1
            lr = cfg.train.lr * lr_factor(step - 1, cfg.train.warmup_steps, cfg.train.max_steps,
                                          cfg.train.lr_schedule, cfg.train.min_lr_ratio)
            set_lr(optimizer, lr)
            micro_batches = [to_device(next(batches), prior.class_conditional, device)
                             for _ in range(cfg.train.grad_accum)]
            logs, check = stage2_step(prior, optimizer, micro_batches, grad_clip=cfg.train.grad_clip,
                                      amp_dtype=amp_dtype, ema=ema, train_prior=train_prior)
            log.step(step, logs, check, lr=lr)
            checkpoint(step)
            samples(step)
            if stop.requested(info, device):
                checkpoint(step, now=True)
                stop.exit(info, last_checkpoint, step)
    check_replicas(prior.gpt, info)
    log.finish(device, last_checkpoint)


def tokenize(vqgan: VQGAN, cfg: Stage2Config, vqgan_path: str, device: torch.device, cache: Path) -> dict:
    """The training split's code indices, from the ``cache`` folder when this checkpoint and data were seen
    before."""

    def training_images() -> tuple[Dataset, int]:
        dataset = build_dataset(cfg.data, "train", augment=False)
        return dataset, num_classes_of(dataset)

    return tokenize_dataset(vqgan, training_images, cache / token_cache_name(vqgan_path, cfg.data, "train"),
                            device, num_workers=cfg.data.num_workers, loader_class=CheckedLoader)


def token_cache_name(vqgan_path: str | Path, data: DataConfig, split: str) -> str:
    """The cache file of ``split``'s tokens: named by the stage-1 checkpoint, the data settings that change images
    and, for an image folder, the names, sizes and modification times of its files (so edited images are
    tokenised again)."""
    settings = {k: v for k, v in to_dict(data).items() if k not in ("num_workers", "random_flip")}
    if data.name == "folder" and Path(data.root).is_dir():
        settings["files"] = folder_fingerprint(data.root)
    return f"{data.name}_{split}_{cache_key(vqgan_path, {'data': settings, 'split': split})}.pt"


def to_device(batch: list[torch.Tensor], class_conditional: bool,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A loader batch of (indices, labels) on ``device``; labels only for a class-conditional prior."""
    indices, labels = batch
    return indices.to(device, non_blocking=True), labels.to(device, non_blocking=True) if class_conditional else None


def save(run_dir: Path, step: int, periodic: bool, config: dict, prior: VQGANPrior, optimizer: torch.optim.Optimizer,
         ema: ModelEMA | None, vqgan_state: dict) -> None:
    """Write ``checkpoints/last.pt`` (and ``step_XXXXXX.pt`` when ``periodic``); the VQGAN travels inside."""
    state = training_checkpoint(KIND, step, config, model=prior.gpt.state_dict(), prior_config=prior.prior_config,
                                ema=ema.state_dict() if ema is not None else None, vqgan=prior.vqgan.state_dict(),
                                vqgan_config=vqgan_state["model_config"], optimizer=optimizer.state_dict())
    save_checkpoint(state, run_dir / "checkpoints" / "last.pt")
    if periodic:
        save_checkpoint(state, run_dir / "checkpoints" / f"step_{step:06d}.pt")


@torch.no_grad()
def write_samples(run_dir: Path, step: int, prior: VQGANPrior, ema: ModelEMA | None, cfg: Stage2Config,
                  amp_dtype: torch.dtype | None) -> None:
    """``samples/step_XXXXXX.png`` (one class per row when class-conditional; the EMA weights when kept) and the
    plots."""
    gpt = prior.gpt
    if ema is not None:
        prior.gpt = ema.module
    prior.eval()
    device = next(prior.parameters()).device
    labels, columns = None, min(8, cfg.train.num_sample_images)
    if prior.class_conditional:
        labels, columns = class_rows(prior.num_classes, cfg.train.num_sample_images)
    count = cfg.train.num_sample_images if labels is None else len(labels)
    generator = torch.Generator(device).manual_seed(cfg.train.seed)
    with autocast(device, amp_dtype):
        _, images = prior.sample(count, labels, temperature=cfg.sample.temperature,
                                 top_k=cfg.sample.top_k, top_p=cfg.sample.top_p,
                                 cfg_scale=cfg.sample.cfg_scale if prior.class_conditional else 1.0,
                                 compile=cfg.sample.compile, generator=generator)
    prior.gpt = gpt
    prior.train()
    save_grid(images, run_dir / "samples" / f"step_{step:06d}.png", nrow=columns)
    plot_training_curves(run_dir / "metrics.csv", run_dir / "plots", PLOT_GROUPS)


def summary(prior: VQGANPrior, num_sequences: int, num_classes: int, env: str, run_dir: Path, vqgan_path: str,
            cfg: Stage2Config, start_step: int) -> str:
    h, w = prior.latent_size
    return "\n".join([
        "GPT prior (stage 2)", f"  run folder   {run_dir}", f"  device       {env}",
        f"  stage 1      {vqgan_path} ({prior.codebook_size} codes, {h}x{w} tokens)",
        f"  data         {num_sequences} token sequences, {num_classes} classes",
        f"  gpt          {count_parameters(prior.gpt) / 1e6:.2f}M params, {cfg.transformer.n_layer} layers",
        f"  steps        {cfg.train.max_steps} x batch {cfg.train.batch_size}"
        + (f" (resumed at {start_step})" if start_step else "")])


def check_stage1_matches(cfg: Stage2Config, vqgan_state: dict, vqgan_path: str) -> None:
    """The stage-1 model must have been trained on images of the size and channels ``cfg.data`` gives."""
    trained = vqgan_state["config"]["data"]
    for key in ("image_size", "channels"):
        if trained[key] != getattr(cfg.data, key):
            raise ConfigError(f"data.{key}={getattr(cfg.data, key)} but the stage-1 checkpoint {vqgan_path} was "
                              f"trained with data.{key}={trained[key]}. Use the data settings of the stage-1 run "
                              f"(its config.yaml), or pass the matching --vqgan checkpoint.")


def check_same_vqgan(resume_state: dict, vqgan: VQGAN, vqgan_path: str) -> None:
    """Resuming must keep the stage-1 model the run started with (its codes are what the GPT learned)."""
    saved, given = resume_state["vqgan"], vqgan.state_dict()
    same = saved.keys() == given.keys() and all(torch.equal(saved[k], given[k].cpu()) for k in saved)
    if not same:
        raise RunDirError(f"--vqgan {vqgan_path} is not the stage-1 model this run was started with, so its codes "
                          f"differ from the ones the GPT learned. Pass the original stage-1 checkpoint, or add "
                          f"--force to continue with this one.")


if __name__ == "__main__":
    main()

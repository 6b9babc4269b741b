"""Stage 2: train a GPT prior over the codes of a trained VQGAN.

    python train_transformer.py --config configs/quickstart_transformer.yaml \\
        --vqgan runs/quickstart/checkpoints/last.pt [--run-dir DIR] [--resume] [key=value ...]
    python train_transformer.py --config configs/quickstart_segmentation_transformer.yaml \\
        --vqgan IMAGE.pt --cond-vqgan SEGMENTATION.pt          # a prior conditioned on condition maps

The training images (and their condition maps, by the condition tokenizer ``--cond-vqgan``) are tokenised
once by the frozen stage-1 models and cached (keyed by both checkpoints and the data config); training then
reads only the cache. The cache lives in ``--token-cache`` (default:
``$VQGAN_TOKEN_CACHE``, else ``$XDG_CACHE_HOME/vqgan/tokens``, else ``~/.cache/vqgan/tokens``): a
per-user folder that does not depend on the current directory, so every run of the same data reuses it.
Under torchrun the first process of each node fills its node's cache and the others read it, so nodes
need not share a disk. Then a loop calls :func:`transformer.training.stage2_step` once per optimizer
step and logs, samples, checkpoints and stops on a signal through the small helpers below.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
from torch.utils.data import Dataset, TensorDataset

from dataloader import (
    CheckedLoader,
    DataError,
    build_dataset,
    build_loader,
    data_settings,
    infinite_batches,
    num_classes_of,
)
from dataloader.crops import Crops
from transformer import VQGANPrior
from transformer.conditions import MAP_KINDS, Condition, build_condition
from transformer.config import Stage2Config
from transformer.pictures import save_condition_grid
from transformer.token_cache import cache_key, default_cache_folder, tokenize_dataset
from transformer.training import stage2_step
from utils.checkpoint import (
    load_checkpoint,
    load_state_dict_checked,
    save_checkpoint,
    set_rng_state,
    training_checkpoint,
)
from utils.config import (
    ConfigError,
    DataConfig,
    building,
    condition_channels,
    is_cropped,
    save_config,
    to_dict,
    training_size,
)
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
SAMPLE_CONDITIONS = 4  # condition rows in the sample grids of a map-conditioned prior
METRIC_COLUMNS = ["lr", "loss", "bits_per_token", "grad_norm", "items_per_s", "bad_steps"]
PLOT_GROUPS = {"prior": ["loss", "bits_per_token", "lr"]}


def main(argv: list[str] | None = None) -> None:
    parser = training_parser(__doc__, Stage2Config)
    parser.add_argument("--vqgan", required=True, help="stage-1 checkpoint (runs/<name>/checkpoints/last.pt)")
    parser.add_argument("--cond-vqgan", default=None,
                        help="stage-1 checkpoint that tokenizes the condition maps (transformer.condition "
                             "segmentation, depth or lowres): a tokenizer trained with data.content=conditions, or "
                             "the image VQGAN itself where the maps have the images' shape")
    parser.add_argument("--token-cache", default=None,
                        help="folder for the tokenised training set (default: $VQGAN_TOKEN_CACHE, else "
                             "$XDG_CACHE_HOME/vqgan/tokens, else ~/.cache/vqgan/tokens)")
    run_training(parser, Stage2Config, train, argv, user_errors=(DataError,))


def train(cfg: Stage2Config, run_dir: Path, args: argparse.Namespace, info: DistInfo) -> None:
    device = resolve_device(cfg.train.device, info)
    configure_backends(device)
    config_dict = to_dict(cfg)
    resume_state = prepare_run(run_dir, config_dict, resume=args.resume, force=args.force, kind=KIND, info=info)
    cache = Path(args.token_cache) if args.token_cache else default_cache_folder()
    with on_every_rank(info):  # every node needs the stage-1 checkpoints and the data
        vqgan_state = load_checkpoint(args.vqgan, kind="vqgan")
        vqgan = VQGAN.from_checkpoint(vqgan_state, args.vqgan).to(device)
        check_stage1_matches(cfg, vqgan_state, args.vqgan)
        cond_vqgan, cond_state = load_condition_tokenizer(cfg, args.cond_vqgan, device)
        if resume_state is not None and not args.force:
            check_same_vqgan(resume_state, "vqgan", vqgan, args.vqgan)
            if cond_vqgan is not None:
                check_same_vqgan(resume_state, "cond_vqgan", cond_vqgan, args.cond_vqgan)
        condition = None if cfg.data.condition == "none" else build_condition(
            cfg.transformer.condition, tokenizer=cond_vqgan, coord_levels=cfg.transformer.coord_levels,
            latent_size=vqgan.latent_size, factor=vqgan.downsample_factor)
        check_crops(cfg, vqgan, condition)
        stage1_paths = [args.vqgan] + ([args.cond_vqgan] if cond_vqgan is not None else [])
        tokens = tokenize(vqgan, condition, cfg, stage1_paths, device, cache) if info.local_rank == 0 else None
    if tokens is None:  # the node's first process has written the cache
        tokens = tokenize(vqgan, condition, cfg, stage1_paths, device, cache)
    indices, labels = tokens["indices"].long(), tokens["labels"].long()
    num_classes = int(tokens["num_classes"])
    if cfg.transformer.condition == "class" and num_classes < 2:
        raise ConfigError(f"transformer.condition=class but the dataset '{cfg.data.name}' has no class labels. Set "
                          f"transformer.condition=none (or data.class_labels=true for a folder with one subfolder "
                          f"per class).")
    conditions = tokens["conditions"].long() if "conditions" in tokens else labels
    sequences = token_sequences(indices, conditions, vqgan, cfg)

    set_seed(cfg.train.seed)  # the same initial weights on every rank
    with building("GPT prior"):
        prior = VQGANPrior(vqgan, cfg.transformer, num_classes, cond_vqgan=cond_vqgan)
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
        print(summary(prior, len(indices), num_classes, describe_environment(device, info), run_dir, args, cfg,
                      start_step))

    train_prior = wrap_ddp(prior, info, device)
    if cfg.train.compile:
        train_prior = compile_module(train_prior)
    loader = build_loader(sequences, cfg.train.batch_size, shuffle=True,
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
            save(run_dir, step, periodic, config_dict, prior, optimizer, ema, vqgan_state, cond_state)

    sample_conditions = held_out_conditions(cfg, device) if info.is_main and prior.condition.kind in (
        *MAP_KINDS, "coord") else None

    def samples(step: int) -> None:
        """A sample grid and plots every ``train.sample_every`` steps and after the last step."""
        if info.is_main and (is_due(step, cfg.train.sample_every) or step == cfg.train.max_steps):
            write_samples(run_dir, step, prior, ema, cfg, amp_dtype, sample_conditions)

    prior.train()
    with StopSignal() as stop, log:
        for step in range(start_step + 1, cfg.train.max_steps + 1):  # counts steps done, from 1
            lr = cfg.train.lr * lr_factor(step - 1, cfg.train.warmup_steps, cfg.train.max_steps,
                                          cfg.train.lr_schedule, cfg.train.min_lr_ratio)
            set_lr(optimizer, lr)
            micro_batches = [to_device(next(batches), prior.conditional, device)
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


def load_condition_tokenizer(cfg: Stage2Config, path: str | None,
                             device: torch.device) -> tuple[VQGAN | None, dict | None]:
    """The stage-1 model that tokenizes the condition maps (and its checkpoint), for the conditions that need one."""
    kind = cfg.transformer.condition
    if kind not in MAP_KINDS:
        if path is not None:
            raise ConfigError(f"--cond-vqgan is given, but transformer.condition={kind} needs no condition tokenizer "
                              f"(only {', '.join(MAP_KINDS)} do). Leave --cond-vqgan out.")
        return None, None
    if path is None:
        raise ConfigError(f"transformer.condition={kind} needs the stage-1 model that tokenizes the {kind} maps: pass "
                          f"--cond-vqgan COND.pt (trained with train_vqgan.py and data.content=conditions, e.g. "
                          f"configs/quickstart_segmentation_vqgan.yaml).")
    state = load_checkpoint(path, kind="vqgan")
    tokenizer = VQGAN.from_checkpoint(state, path).to(device)
    want_labels = cfg.data.num_labels if kind == "segmentation" else 0
    shape = (tokenizer.num_labels, tokenizer.in_channels, tokenizer.resolution)
    if shape != (want_labels, condition_channels(cfg.data), training_size(cfg.data)):
        what = (f"segmentation maps of {cfg.data.num_labels} labels" if kind == "segmentation"
                else f"{kind} maps of {condition_channels(cfg.data)} channel(s)")
        raise ConfigError(f"--cond-vqgan {path} tokenizes {_tokenizer_input(tokenizer)}, but this data gives {what} "
                          f"at {training_size(cfg.data)}px. Pass the tokenizer trained on these maps (train_vqgan.py "
                          f"with this data section and data.content=conditions).")
    return tokenizer, state


def _tokenizer_input(tokenizer: VQGAN) -> str:
    if tokenizer.num_labels:
        return f"segmentation maps of {tokenizer.num_labels} labels at {tokenizer.resolution}px"
    return f"{tokenizer.in_channels}-channel maps at {tokenizer.resolution}px"


def tokenize(vqgan: VQGAN, condition: Condition | None, cfg: Stage2Config, stage1_paths: list[str],
             device: torch.device, cache: Path) -> dict:
    """The training split's code indices (and the tokens of its condition maps, for a ``condition`` that takes
    them), from the ``cache`` folder when these checkpoints and data were seen before."""

    def training_images() -> tuple[Dataset, int]:  # whole images: crops are taken from their code grids
        dataset = build_dataset(dataclasses.replace(cfg.data, crop_size=None), "train", augment=False)
        return dataset, num_classes_of(dataset)

    coord = cfg.data.condition == "coord"
    extra = {"coord_levels": cfg.transformer.coord_levels, "coord_ids": "rounded"} if coord else {}
    tokenizer = None if condition is None else lambda maps: condition.tokens(maps, len(maps))
    return tokenize_dataset(vqgan, training_images,
                            cache / token_cache_name(stage1_paths, cfg.data, "train", extra),
                            device, num_workers=cfg.data.num_workers, loader_class=CheckedLoader, condition=tokenizer)


def check_crops(cfg: Stage2Config, vqgan: VQGAN, condition: Condition | None) -> None:
    """With ``data.crop_size`` the whole images are tokenized and cropped in codes: their size must be a multiple of
    the VQGAN's downsampling, and a condition map's tokens must lie on the codes' grid to be cropped alike."""
    if not is_cropped(cfg.data):
        return
    factor = vqgan.downsample_factor
    if cfg.data.image_size % factor:
        raise ConfigError(f"data.image_size={cfg.data.image_size} is not a multiple of the VQGAN's downsampling factor "
                          f"{factor}; the whole images are tokenized and cropped in codes. Use a multiple, e.g. "
                          f"data.image_size={cfg.data.image_size // factor * factor}.")
    h, w = vqgan.latent_size
    if condition is not None and condition.spatial and condition.num_tokens != h * w:
        raise ConfigError(f"data.crop_size crops the condition's tokens with the image's codes, but the condition "
                          f"gives {condition.num_tokens} tokens for {h}x{w} codes. Use a condition tokenizer with the "
                          f"image VQGAN's downsampling factor {factor}.")


def token_sequences(indices: torch.Tensor, conditions: torch.Tensor, vqgan: VQGAN, cfg: Stage2Config) -> Dataset:
    """The training items (codes, condition tokens or label): whole code grids, or with ``data.crop_size`` random
    windows of the whole images' code grids (the condition's tokens cropped alike), the windows the sampler slides."""
    if not is_cropped(cfg.data):
        return TensorDataset(indices, conditions)
    side = cfg.data.image_size // vqgan.downsample_factor
    grids = indices.view(len(indices), side, side)
    if conditions.dim() == 2:  # condition tokens, on the codes' grid (check_crops)
        conditions = conditions.view(len(conditions), side, side)
    return Crops(TensorDataset(grids, conditions), vqgan.latent_size[0], random=True)


def token_cache_name(stage1_paths: list[str], data: DataConfig, split: str, extra: dict | None = None) -> str:
    """The cache file of ``split``'s tokens: named by the stage-1 checkpoints and the data settings that change the
    whole images (crops are taken from their codes)."""
    settings = {**data_settings(data, ignore=("random_flip", "crop_size")), **(extra or {})}
    return f"{data.name}_{split}_{cache_key(stage1_paths, {'data': settings, 'split': split})}.pt"


def to_device(batch: list[torch.Tensor], conditional: bool,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A loader batch of (indices, condition tokens or labels) on ``device``; the condition only for a conditional
    prior."""
    indices, conditions = batch
    return indices.to(device, non_blocking=True), conditions.to(device, non_blocking=True) if conditional else None


def save(run_dir: Path, step: int, periodic: bool, config: dict, prior: VQGANPrior, optimizer: torch.optim.Optimizer,
         ema: ModelEMA | None, vqgan_state: dict, cond_state: dict | None) -> None:
    """Write ``checkpoints/last.pt`` (and ``step_XXXXXX.pt`` when ``periodic``); the stage-1 models travel inside."""
    tokenizer = prior.cond_vqgan
    cond = {} if tokenizer is None else {"cond_vqgan": tokenizer.state_dict(),
                                         "cond_vqgan_config": cond_state["model_config"]}
    state = training_checkpoint(KIND, step, config, model=prior.gpt.state_dict(), prior_config=prior.prior_config,
                                ema=ema.state_dict() if ema is not None else None, vqgan=prior.vqgan.state_dict(),
                                vqgan_config=vqgan_state["model_config"], optimizer=optimizer.state_dict(), **cond)
    save_checkpoint(state, run_dir / "checkpoints" / "last.pt")
    if periodic:
        save_checkpoint(state, run_dir / "checkpoints" / f"step_{step:06d}.pt")


def held_out_conditions(cfg: Stage2Config, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(condition maps, real images) of the first held-out items, for the sample grids of a map-conditioned prior."""
    dataset = build_dataset(cfg.data, "test", augment=False)
    items = [dataset[i] for i in range(min(SAMPLE_CONDITIONS, len(dataset)))]
    return torch.stack([item[1] for item in items]).to(device), torch.stack([item[0] for item in items])


@torch.no_grad()
def write_samples(run_dir: Path, step: int, prior: VQGANPrior, ema: ModelEMA | None, cfg: Stage2Config,
                  amp_dtype: torch.dtype | None, held_out: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """``samples/step_XXXXXX.png`` (one class per row when class-conditional; condition | samples | real image rows
    for condition maps; the EMA weights when kept) and the plots."""
    gpt = prior.gpt
    if ema is not None:
        prior.gpt = ema.module
    prior.eval()
    device = next(prior.parameters()).device
    condition, columns = None, min(8, cfg.train.num_sample_images)
    if prior.class_conditional:
        condition, columns = class_rows(prior.num_classes, cfg.train.num_sample_images)
    elif held_out is not None:
        per_row = max(1, cfg.train.num_sample_images // len(held_out[0]))
        condition = held_out[0].repeat_interleave(per_row, dim=0)
    count = cfg.train.num_sample_images if condition is None else len(condition)
    generator = torch.Generator(device).manual_seed(cfg.train.seed)
    with autocast(device, amp_dtype):
        _, images = prior.sample(count, condition, temperature=cfg.sample.temperature,
                                 top_k=cfg.sample.top_k, top_p=cfg.sample.top_p,
                                 cfg_scale=cfg.sample.cfg_scale if prior.conditional else 1.0,
                                 compile=cfg.sample.compile, generator=generator)
    prior.gpt = gpt
    prior.train()
    path = run_dir / "samples" / f"step_{step:06d}.png"
    if held_out is not None:
        save_condition_grid(held_out[0], images.clamp(-1, 1).float().cpu(), held_out[1], prior.condition.kind,
                            cfg.data.num_labels, path)
    else:
        save_grid(images, path, nrow=columns)
    plot_training_curves(run_dir / "metrics.csv", run_dir / "plots", PLOT_GROUPS)


def summary(prior: VQGANPrior, num_sequences: int, num_classes: int, env: str, run_dir: Path,
            args: argparse.Namespace, cfg: Stage2Config, start_step: int) -> str:
    h, w = prior.latent_size
    condition = prior.condition.kind
    if prior.cond_vqgan is not None:
        condition += f" maps, {prior.prefix_len} tokens from {args.cond_vqgan}"
    return "\n".join([
        "GPT prior (stage 2)", f"  run folder   {run_dir}", f"  device       {env}",
        f"  stage 1      {args.vqgan} ({prior.codebook_size} codes, {h}x{w} tokens)",
        f"  condition    {condition}",
        f"  data         {num_sequences} token sequences, {num_classes} classes",
        f"  gpt          {count_parameters(prior.gpt) / 1e6:.2f}M params, {cfg.transformer.n_layer} layers",
        f"  steps        {cfg.train.max_steps} x batch {cfg.train.batch_size}"
        + (f" (resumed at {start_step})" if start_step else "")])


def check_stage1_matches(cfg: Stage2Config, vqgan_state: dict, vqgan_path: str) -> None:
    """The stage-1 model must have been trained on images of the size and channels ``cfg.data`` gives."""
    trained = vqgan_state["config"]["data"]
    if trained["channels"] != cfg.data.channels:
        raise ConfigError(f"data.channels={cfg.data.channels} but the stage-1 checkpoint {vqgan_path} was trained with "
                          f"data.channels={trained['channels']}. Use the data settings of the stage-1 run (its "
                          f"config.yaml), or pass the matching --vqgan checkpoint.")
    trained_size = trained.get("crop_size") or trained["image_size"]
    if trained_size != training_size(cfg.data):
        key = "data.crop_size" if cfg.data.crop_size else "data.image_size"
        raise ConfigError(f"{key}={training_size(cfg.data)} but the stage-1 checkpoint {vqgan_path} was trained on "
                          f"{trained_size}px images, the window the prior learns. Train the prior on squares of "
                          f"{trained_size}px (data.image_size, or data.crop_size for crops of larger images), or pass "
                          f"the matching --vqgan checkpoint.")
    if trained.get("content", "images") != "images":
        raise ConfigError(f"--vqgan {vqgan_path} tokenizes condition maps (data.content={trained['content']}), not "
                          f"images. Pass the image VQGAN as --vqgan and this one as --cond-vqgan.")


def check_same_vqgan(resume_state: dict, entry: str, vqgan: VQGAN, vqgan_path: str) -> None:
    """Resuming must keep the stage-1 models the run started with (their codes are what the GPT learned)."""
    saved, given = resume_state.get(entry) or {}, vqgan.state_dict()
    same = saved.keys() == given.keys() and all(torch.equal(saved[k], given[k].cpu()) for k in saved)
    if not same:
        flag = "--vqgan" if entry == "vqgan" else "--cond-vqgan"
        raise RunDirError(f"{flag} {vqgan_path} is not the stage-1 model this run was started with, so its codes "
                          f"differ from the ones the GPT learned. Pass the original stage-1 checkpoint, or add "
                          f"--force to continue with this one.")


if __name__ == "__main__":
    main()

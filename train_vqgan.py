"""Stage 1: train a VQGAN from a YAML config.

    python train_vqgan.py --config configs/quickstart.yaml [--run-dir DIR] [--resume] [key=value ...]
    torchrun --nproc_per_node=N train_vqgan.py --config ...
    python train_vqgan.py --config configs/quickstart.yaml --describe-config    # every key, its default

Reads top to bottom: build the data, models and optimizers (or restore them from the run's last
checkpoint), then a loop that calls :func:`vqgan.training.stage1_step` once per optimizer step and
logs, samples, checkpoints and stops on a signal through the small helpers below.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dataloader import DataError, build_dataset, build_loader, infinite_batches
from utils.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_state_dict_checked,
    save_checkpoint,
    set_rng_state,
    training_checkpoint,
)
from utils.config import config_diff, save_config, to_dict
from utils.device import autocast_dtype, configure_backends, conv_memory_format, describe_environment, resolve_device
from utils.distributed import DistInfo, on_every_rank, wrap_ddp
from utils.logging import TrainingLog
from utils.loop import BadStepTracker, StopSignal, check_replicas, is_due
from utils.pictures import label_pictures, plot_training_curves, save_reconstruction_grid
from utils.run_dir import prepare_run
from utils.script import run_training, training_parser
from utils.training import ModelEMA, autocast, compile_module, count_parameters, lr_factor, make_adam, set_lr, set_seed
from vqgan import VQGAN, Discriminator, VQGANLoss
from vqgan.config import Stage1Config, build_stage1
from vqgan.lpips import LPIPSWeightsError, LPIPSWeightsMismatchError
from vqgan.training import stage1_step

KIND = "vqgan"
METRIC_COLUMNS = ["lr", "total", "rec_loss", "p_loss", "codebook_loss", "g_loss", "d_weight", "gan_factor",
                  "d_loss", "lecam_loss", "logits_real", "logits_fake", "usage", "perplexity", "grad_norm",
                  "items_per_s", "bad_steps"]
PLOT_GROUPS = {
    "losses": ["total", "rec_loss", "p_loss", "codebook_loss"],
    "gan": ["g_loss", "d_loss", "d_weight", "logits_real", "logits_fake"],
    "codebook": ["usage", "perplexity"],
}


def main(argv: list[str] | None = None) -> None:
    run_training(training_parser(__doc__, Stage1Config), Stage1Config, train, argv,
                 user_errors=(DataError, LPIPSWeightsError, LPIPSWeightsMismatchError))


def train(cfg: Stage1Config, run_dir: Path, args: argparse.Namespace, info: DistInfo) -> None:
    device = resolve_device(cfg.train.device, info)
    configure_backends(device)
    config_dict = to_dict(cfg)
    resume_state = prepare_run(run_dir, config_dict, resume=args.resume, force=args.force, kind=KIND, info=info)
    set_seed(cfg.train.seed)  # the same initial weights and codebook on every rank
    with on_every_rank(info):  # every node needs the data (and the init_from checkpoint)
        train_set, eval_set = build_dataset(cfg.data, "train"), build_dataset(cfg.data, "test")
        model, disc, loss_fn = build_stage1(cfg)
        if cfg.train.init_from and resume_state is None:  # a new run from trained weights; --resume ignores it
            init_from_checkpoint(cfg.train.init_from, model, disc, cfg, verbose=info.is_main)
    set_seed(cfg.train.seed + info.rank)
    memory_format = conv_memory_format(device, cfg.train.channels_last, cfg.train.compile)
    model.to(device, memory_format=memory_format)
    disc.to(device, memory_format=memory_format)
    loss_fn.to(device)
    disc_lr = cfg.train.disc_lr or cfg.train.lr
    opt_ae = make_adam(model.parameters(), cfg.train.lr, cfg.train.betas, cfg.train.weight_decay, device)
    opt_disc = make_adam(disc.parameters(), disc_lr, cfg.train.betas, cfg.train.weight_decay, device)
    start_step = 0
    if resume_state is not None:
        start_step = restore(resume_state, run_dir, model, disc, loss_fn, opt_ae, opt_disc)
    # The EMA starts from the resumed weights when the checkpoint has none yet.
    ema = ModelEMA(model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    if ema is not None and resume_state is not None and resume_state.get("ema") is not None:
        ema.load_state_dict(resume_state["ema"])
    if info.is_main:
        save_config(cfg, run_dir / "config.yaml")
        print(summary(model, disc, loss_fn, len(train_set), describe_environment(device, info), run_dir, cfg))
        if start_step:
            print(f"  resumed at   step {start_step}")

    train_model = wrap_ddp(model, info, device, sync_buffers_every_step=False)  # the quantizer syncs its own
    train_disc = wrap_ddp(disc, info, device)
    if cfg.train.compile:
        train_model, train_disc = compile_module(train_model), compile_module(train_disc)
    loader = build_loader(train_set, cfg.train.batch_size, shuffle=True, num_workers=cfg.data.num_workers,
                          device_type=device.type, seed=cfg.train.seed, distributed=info.enabled)
    batches = infinite_batches(loader, start_step=start_step * cfg.train.grad_accum)
    sample_inputs = torch.stack([eval_set[i][0] for i in range(min(cfg.train.num_sample_images, len(eval_set)))])
    sample_inputs = sample_inputs.to(device)
    amp_dtype = autocast_dtype(device, cfg.train.precision)
    last_checkpoint = run_dir / "checkpoints" / "last.pt"
    log = TrainingLog(run_dir, METRIC_COLUMNS, start_step=start_step, max_steps=cfg.train.max_steps,
                      log_every=cfg.train.log_every, desc="stage 1", postfix_keys=("rec_loss", "usage", "items_per_s"),
                      items_per_step=cfg.train.batch_size * cfg.train.grad_accum * info.world_size,
                      is_main=info.is_main, bad_steps=BadStepTracker(cfg.train.max_bad_steps, last_checkpoint))

    def checkpoint(step: int, now: bool = False) -> None:
        """``last.pt`` (and ``step_XXXXXX.pt``) every ``train.ckpt_every`` steps, after the last step, or ``now``."""
        periodic = is_due(step, cfg.train.ckpt_every) and not now
        if info.is_main and (now or periodic or step == cfg.train.max_steps):
            save(run_dir, step, periodic, config_dict, model, disc, loss_fn, opt_ae, opt_disc, ema)

    def samples(step: int) -> None:
        """Reconstructions and plots every ``train.sample_every`` steps and after the last step."""
        if info.is_main and (is_due(step, cfg.train.sample_every) or step == cfg.train.max_steps):
            write_samples(run_dir, step, ema.module if ema else model, sample_inputs, amp_dtype)

    model.train()
    disc.train()
    with StopSignal() as stop, log:
        for step in range(start_step, cfg.train.max_steps):
            lr_scale = lr_factor(step, cfg.train.warmup_steps, cfg.train.max_steps, cfg.train.lr_schedule,
                                 cfg.train.min_lr_ratio)
            set_lr(opt_ae, cfg.train.lr * lr_scale)
            set_lr(opt_disc, disc_lr * lr_scale)
            micro_batches = [next(batches)[0].to(device, non_blocking=True, memory_format=memory_format)
                             for _ in range(cfg.train.grad_accum)]
            logs, check = stage1_step(model, disc, loss_fn, opt_ae, opt_disc, micro_batches, step,
                               grad_clip=cfg.train.grad_clip, amp_dtype=amp_dtype, ema=ema,
                               train_model=train_model, train_disc=train_disc)
            log.step(step + 1, logs, check, lr=cfg.train.lr * lr_scale)
            checkpoint(step + 1)
            samples(step + 1)
            if stop.requested(info, device):
                checkpoint(step + 1, now=True)
                stop.exit(info, last_checkpoint, step + 1)
    check_replicas(model, info)
    log.finish(device, last_checkpoint)


# Config values that decide which weights exist and their shapes.
SHAPE_KEYS = {
    "data": ("channels",),
    "model": ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "codebook_size", "embed_dim",
              "codebook_dim", "ema", "usage_window"),
    "disc": ("ndf", "n_layers", "norm"),
}


def init_from_checkpoint(path: str, model: VQGAN, disc: Discriminator, cfg: Stage1Config,
                         verbose: bool = True) -> str:
    """Load the autoencoder (EMA weights when the run kept them) and discriminator weights of ``path``.

    Optimizers, step and RNG are not taken: the caller starts a new run. A checkpoint without a
    discriminator leaves ``disc`` as built. Raises :class:`CheckpointError` when the shapes do not
    fit ``cfg``, listing the config values that differ. Returns (and with ``verbose`` prints) a line
    describing what was loaded.
    """
    state = load_checkpoint(path, kind="vqgan")
    source = f"train.init_from={path}"
    try:
        load_state_dict_checked(model, state.get("ema") or state["model"], source)
        if state.get("disc") is not None:
            load_state_dict_checked(disc, state["disc"], f"{source} (discriminator)")
    except CheckpointError as err:
        differences = config_diff(_shape_values(state.get("config") or {}), _shape_values(to_dict(cfg)))
        hint = ("\nConfig values that differ (checkpoint -> this config): " + "; ".join(differences)
                if differences else "")
        raise CheckpointError(f"{err}{hint}\nFor train.init_from the config's model and disc sections must "
                              f"describe the checkpoint's networks (for taming's ImageNet VQGANs: "
                              f"configs/imagenet_f16_1024.yaml or configs/imagenet_f16_16384.yaml).") from err
    disc_note = "discriminator too" if state.get("disc") is not None else "no discriminator in it: a new one"
    line = f"initialised from {path} (step {state.get('step', 0)}; {disc_note}); optimizers start fresh"
    if verbose:
        print(line)
    return line


def _shape_values(config: dict) -> dict[str, dict]:
    """The values of ``SHAPE_KEYS`` in a config dict, by section."""
    return {section: {key: (config.get(section) or {}).get(key) for key in keys}
            for section, keys in SHAPE_KEYS.items()}


def restore(state: dict, run_dir: Path, model: VQGAN, disc: Discriminator, loss_fn: VQGANLoss,
            opt_ae: torch.optim.Optimizer, opt_disc: torch.optim.Optimizer) -> int:
    """Load a resumed run's weights, optimizer states, LeCam anchors and RNG; the step it had reached."""
    source = str(run_dir / "checkpoints" / "last.pt")
    load_state_dict_checked(model, state["model"], source)
    load_state_dict_checked(disc, state["disc"], source)
    load_state_dict_checked(loss_fn.lecam, state["lecam"], source)
    opt_ae.load_state_dict(state["opt_ae"])
    opt_disc.load_state_dict(state["opt_disc"])
    set_rng_state(state["rng"])
    return state["step"]


def save(run_dir: Path, step: int, periodic: bool, config: dict, model: VQGAN, disc: Discriminator,
         loss_fn: VQGANLoss, opt_ae: torch.optim.Optimizer, opt_disc: torch.optim.Optimizer,
         ema: ModelEMA | None) -> None:
    """Write ``checkpoints/last.pt`` (and ``step_XXXXXX.pt`` when ``periodic``)."""
    state = training_checkpoint(KIND, step, config, model=model.state_dict(), model_config=model.model_config,
                                disc=disc.state_dict(), ema=ema.state_dict() if ema is not None else None,
                                opt_ae=opt_ae.state_dict(), opt_disc=opt_disc.state_dict(),
                                lecam=loss_fn.lecam.state_dict())
    save_checkpoint(state, run_dir / "checkpoints" / "last.pt")
    if periodic:
        save_checkpoint(state, run_dir / "checkpoints" / f"step_{step:06d}.pt")


@torch.no_grad()
def write_samples(run_dir: Path, step: int, net: VQGAN, inputs: torch.Tensor, amp_dtype: torch.dtype | None) -> None:
    """``samples/step_XXXXXX.png`` (held-out inputs above their reconstructions; label maps in colour) and the
    refreshed plots."""
    was_training = net.training
    net.eval()
    with autocast(inputs.device, amp_dtype):
        reconstructions = net.outputs(net(inputs).reconstruction)
    net.train(was_training)
    if net.num_labels:
        inputs, reconstructions = (label_pictures(maps, net.num_labels) for maps in (inputs, reconstructions))
    save_reconstruction_grid(inputs, reconstructions, run_dir / "samples" / f"step_{step:06d}.png")
    plot_training_curves(run_dir / "metrics.csv", run_dir / "plots", PLOT_GROUPS)


def summary(model: VQGAN, disc: Discriminator, loss: VQGANLoss, dataset_size: int, env: str,
            run_dir: Path, cfg: Stage1Config) -> str:
    what = "images" if cfg.data.content == "images" else f"{cfg.data.condition} maps"
    size = f"{cfg.data.image_size}px" + (f", {cfg.data.crop_size}px crops" if cfg.data.crop_size else "")
    parts = {"encoder": model.encoder, "decoder": model.decoder, "quantizer": model.quantizer,
             "discriminator": disc}
    lines = ["VQGAN stage 1", f"  run folder   {run_dir}", f"  device       {env}",
             f"  data         {cfg.data.name} ({dataset_size} train {what}, {size}, "
             f"{model.in_channels} ch)",
             f"  tokens       {model.latent_size[0]}x{model.latent_size[1]} from {model.codebook_size} codes"]
    lines += [f"  {name:<12} {count_parameters(module) / 1e6:.2f}M params" for name, module in parts.items()]
    lines.append(f"  perceptual   {'LPIPS weight ' + str(cfg.loss.perceptual_weight) if loss.lpips else 'off'}")
    lines.append(f"  steps        {cfg.train.max_steps} x batch {cfg.train.batch_size} x accum {cfg.train.grad_accum}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

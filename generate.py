"""Use trained checkpoints: sample images, measure reconstructions, export tokens, draw pictures.

    python generate.py sample --checkpoint STAGE2.pt --num 64 --out DIR [--class C ...] [--seed S]
        [--temperature T] [--top-k K] [--top-p P] [--cfg-scale S] [--compile] [--fid-ref test|CONFIG|FOLDER]
        [--class-fidelity]
    python generate.py sample --checkpoint STAGE2.pt --condition FOLDER|test --out DIR [--samples-per-condition K]
    python generate.py sample --checkpoint STAGE2.pt --size H [W] ...  (beyond the training size: sliding window)
    python generate.py complete --checkpoint STAGE2.pt --input test|CONFIG|FOLDER --keep 0.5 --out DIR
        [--samples-per-input K] [--class C ...]
    python generate.py reconstruct --checkpoint STAGE1.pt --input test|CONFIG|FOLDER --out DIR
        [--num N] [--fid] [--lpips]
    python generate.py tokens --checkpoint STAGE1.pt --input test|CONFIG|FOLDER --out FILE.npy
    python generate.py tokens --decode --checkpoint STAGE1.pt --input FILE.npy --out DIR
    python generate.py visualize --checkpoint STAGE1_OR_STAGE2.pt --out DIR [--run-dir runs/NAME]
    python generate.py import-taming --checkpoint last.ckpt --out STAGE1_OR_STAGE2.pt [--resolution 256]
        [--config model.yaml]

Image inputs (``--input``, ``--fid-ref``): ``test`` is the test split of the data the checkpoint
was trained on; a YAML config means the test split of its ``data`` section; a folder means every
image under it. Images are resized to the model's resolution and channel count. Everything runs
without gradients, in eval mode, in batches on ``--device`` (default: CUDA when available).

Condition inputs (``sample --condition``, and ``complete --input`` for a map-conditioned prior): ``test``
(the checkpoint's own test split, condition maps and images), or a folder: ``FOLDER/conditions/NAME.png``
with the real images, where there are some, in ``FOLDER/images/NAME.*``; otherwise every file in
``FOLDER`` is a condition map (for a low-res prior: a low-resolution image of any size). Each output is
``OUT/NAME.png`` (``OUT/NAME_k.png`` for the ``k``-th of several samples per input).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from dataloader import DataError, build_dataset, class_names_of, data_settings, num_classes_of
from dataloader.inputs import ConditionedInputs, ImageSet, conditioned_inputs, data_config_of, resolve_images
from dataloader.transforms import coord_map
from transformer import VQGANPrior
from transformer.conditions import MAP_KINDS
from transformer.config import Stage2Config, check_sampling
from transformer.pictures import prior_samples_picture, save_condition_grid
from transformer.sampling import SamplingConfig
from transformer.taming_import import import_taming_checkpoint
from transformer.token_cache import cache_key, default_cache_folder
from transformer.window import Progress
from utils import demo
from utils.checkpoint import load_checkpoint
from utils.config import ConfigError, check_number, from_dict
from utils.evaluation.class_fidelity import FidelityTally, JudgeSettings, cached_judge
from utils.evaluation.inception import InceptionWeightsError, load_inception
from utils.evaluation.metrics import FeatureSet, generation_fid
from utils.logging import MetricsFileError, read_metrics
from utils.pictures import grid_picture, save_grid, save_images, save_reconstruction_grid, training_curves_picture
from utils.run_dir import prove_writable
from utils.script import StrictParser, clean_exit
from vqgan import LPIPS, VQGAN, LPIPSWeightsError, LPIPSWeightsMismatchError
from vqgan.evaluation import ReconstructionMetrics, decode_batches, reconstruct_batches
from vqgan.pictures import tokenizer_pictures
from vqgan.tiled_decode import decode_grid

GRID_IMAGES = 64
GRID_CONDITIONS = 16  # rows of the condition and completion grids
GRID_COLUMNS = 8
MAX_CLASS_COLUMNS = 16


class UsageError(Exception):
    """A request that cannot be carried out; the message says why and what to pass instead."""


def pick_device(spec: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; otherwise the named device, which must exist."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise UsageError(f"--device {spec!r} is not a device; use auto, cpu, cuda or cuda:N.") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {spec} but CUDA is not available; use --device cpu or auto.")
    return device


def output_folder(spec: str) -> Path:
    """The ``--out`` folder, checked before any work: it must be a folder or a name one can be created at, and
    writable."""
    out = Path(spec)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {spec} is an existing file, but it names the folder to write into. Pick a folder "
                         f"name (it is created), or move the file away.")
    _check_creatable(out, spec)
    _check_writable(out, spec)
    return out


def output_file(spec: str, suffix: str) -> Path:
    """The ``--out`` file (``suffix`` appended when missing), checked before any work."""
    given = Path(spec)
    out = given if given.suffix == suffix else given.with_name(given.name + suffix)
    if given.is_dir() or out.is_dir():
        raise UsageError(f"--out {spec} is a folder, but it names the {suffix} file to write. Pass a file name, "
                         f"e.g. tokens{suffix}.")
    _check_creatable(out.parent, spec)
    _check_writable(out.parent, spec)
    return out


def _check_creatable(folder: Path, spec: str) -> None:
    """``folder`` exists, or its nearest existing parent is a folder it can be created in."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--out {spec}: '{existing}' is a file, so no folder can be created inside it. Pick "
                         f"another path.")


def _check_writable(folder: Path, spec: str) -> None:
    """Create ``folder`` and prove a file can be written in it, so a long job cannot fail at its end."""
    try:
        prove_writable(folder)
    except OSError as err:
        raise UsageError(f"--out {spec}: cannot write to '{folder}' ({err.strerror or err}). Pick a folder you can "
                         f"write to, or fix its permissions / free disk space.") from err


def image_shape(vqgan: VQGAN) -> dict[str, int]:
    return {"image_size": vqgan.resolution, "channels": vqgan.in_channels}


def report(metrics: dict[str, Any], out_dir: Path, title: str) -> None:
    """Write ``out_dir/metrics.json`` and print the numbers as a table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    width = max(len(key) for key in metrics)
    lines = [title, "-" * max(len(title), width + 14)]
    for key, value in metrics.items():
        shown = f"{value:.4f}" if isinstance(value, float) else "n/a" if value is None else str(value)
        lines.append(f"{key:<{width}}  {shown}")
    print("\n".join(lines))
    print(f"wrote {out_dir / 'metrics.json'}")


def sampling_settings(prior: VQGANPrior, state: dict, args: argparse.Namespace) -> dict[str, Any]:
    """Temperature, top-k, top-p, CFG scale, compile and window caches: the flags given, else the checkpoint's
    ``sample`` section."""
    defaults = from_dict(Stage2Config, state["config"]).sample
    given = {key: getattr(args, key, None) for key in ("temperature", "top_k", "top_p", "cfg_scale", "compile",
                                                        "window_caches")}
    settings = {key: getattr(defaults, key) if value is None else value for key, value in given.items()}
    if settings["top_k"] == 0:
        settings["top_k"] = None
    try:
        check_sampling(SamplingConfig(**settings), {key: "--" + key.replace("_", "-") for key, value in given.items()
                                                    if value is not None})
    except ConfigError as err:
        raise UsageError(str(err)) from err
    if not prior.conditional:
        if given["cfg_scale"] not in (None, 1.0):
            raise UsageError(f"--cfg-scale {given['cfg_scale']} needs a conditional prior, and this one is "
                             f"unconditional; leave --cfg-scale out.")
        settings["cfg_scale"] = 1.0
    return settings


def class_cycle(prior: VQGANPrior, classes: list[int] | None) -> torch.Tensor | None:
    """The class ids samples take in turn: the ``--class`` ids, or 0..C-1 when none are given (None for an
    unconditional prior)."""
    if classes is None:
        return torch.arange(prior.num_classes) if prior.class_conditional else None
    requested = torch.tensor(classes, dtype=torch.long)
    try:
        prior.check_labels(requested)
    except ValueError as err:
        raise UsageError(f"--class: {err}") from err
    return requested


def sample_labels(cycle: torch.Tensor | None, start: int, count: int) -> torch.Tensor | None:
    """The classes of samples ``start`` to ``start + count - 1``: sample i takes ``cycle[i mod len(cycle)]``."""
    return None if cycle is None else cycle[torch.arange(start, start + count) % len(cycle)]


def load_vqgan(path: str, device: torch.device) -> tuple[VQGAN, dict]:
    """A stage-1 checkpoint: (VQGAN in eval mode on ``device``, checkpoint dict)."""
    state = load_checkpoint(path, kind="vqgan")
    return VQGAN.from_checkpoint(state, path).to(device), state


def prior_from_state(state: dict, path: str, device: torch.device) -> VQGANPrior:
    """The prior of a stage-2 checkpoint dict, around the VQGAN (and condition tokenizer) that travel inside it, in
    eval mode."""
    stage1 = {"model_config": state["vqgan_config"], "model": state["vqgan"]}
    vqgan = VQGAN.from_checkpoint(stage1, f"{path} (stage-1 part)")
    cond_vqgan = None
    if state.get("cond_vqgan") is not None:
        tokenizer = {"model_config": state.get("cond_vqgan_config") or {}, "model": state["cond_vqgan"]}
        cond_vqgan = VQGAN.from_checkpoint(tokenizer, f"{path} (condition tokenizer)")
    return VQGANPrior.from_checkpoint(vqgan, state, path, cond_vqgan).to(device)


def load_prior(path: str, device: torch.device) -> tuple[VQGANPrior, dict]:
    """A stage-2 checkpoint: (prior in eval mode on ``device``, checkpoint dict)."""
    state = load_checkpoint(path, kind="transformer")
    return prior_from_state(state, path, device), state


def load_any(path: str, device: torch.device) -> tuple[VQGAN, VQGANPrior | None, dict]:
    """A stage-1 or a stage-2 checkpoint: (VQGAN, prior or None, checkpoint dict)."""
    state = load_checkpoint(path)
    if state["kind"] == "transformer":
        prior = prior_from_state(state, path, device)
        return prior.vqgan, prior, state
    return VQGAN.from_checkpoint(state, path).to(device), None, state


def check_reads_images(vqgan: VQGAN) -> None:
    """Commands that read or write images need a tokenizer of images (or of image-like maps), not of label maps."""
    if vqgan.num_labels:
        raise UsageError(f"this checkpoint tokenizes segmentation maps of {vqgan.num_labels} labels, not images, so "
                         f"it cannot reconstruct, tokenize or decode pictures. Pass an image VQGAN; a segmentation "
                         f"tokenizer is used through a prior (train_transformer.py --cond-vqgan).")


def input_images(spec: str, vqgan: VQGAN, state: dict, limit: int | None = None) -> ImageSet:
    check_reads_images(vqgan)
    return resolve_images(spec, data_config_of(state["config"]), limit=limit, **image_shape(vqgan))


def sample_grid(prior: VQGANPrior, size: list[int] | None) -> tuple[int, int]:
    """The code grid of ``--size H [W]`` (pixels): a multiple of the VQGAN's downsampling, at least the training
    size; the training grid when ``--size`` is not given."""
    if size is None:
        return prior.latent_size
    if len(size) > 2:
        raise UsageError(f"--size takes the height and width in pixels (or one number for a square), got {size}.")
    height, width = size if len(size) == 2 else size * 2
    factor = prior.vqgan.downsample_factor
    smallest = (prior.latent_size[0] * factor, prior.latent_size[1] * factor)
    if height % factor or width % factor:
        raise UsageError(f"--size {height} {width}: both sides must be multiples of the VQGAN's downsampling factor "
                         f"{factor}; try --size {round(height / factor) * factor} {round(width / factor) * factor}.")
    if height < smallest[0] or width < smallest[1]:
        raise UsageError(f"--size {height} {width} is smaller than the prior's training size {smallest[0]}x"
                         f"{smallest[1]}, the window it slides over larger images; use at least that.")
    return height // factor, width // factor


@dataclasses.dataclass
class LoadedPrior:
    """A stage-2 checkpoint already loaded, for commands run again and again on it (the demo page)."""

    prior: VQGANPrior
    state: dict
    device: torch.device


def loaded_prior(args: argparse.Namespace, loaded: LoadedPrior | None) -> LoadedPrior:
    """``loaded``, or the prior of ``--checkpoint`` on ``--device``."""
    if loaded is not None:
        return loaded
    device = pick_device(args.device)
    return LoadedPrior(*load_prior(args.checkpoint, device), device)


def cmd_sample(args: argparse.Namespace, loaded: LoadedPrior | None = None, progress: Progress | None = None) -> Path:
    """``sample``; returns the grid picture's path. ``progress`` see :meth:`transformer.VQGANPrior.sample`."""
    out = output_folder(args.out)
    model = loaded_prior(args, loaded)
    prior, state, device = model.prior, model.state, model.device
    settings = sampling_settings(prior, state, args)
    settings["grid"] = sample_grid(prior, args.size)
    for flag, given in (("--fid-ref", args.fid_ref is not None), ("--class-fidelity", args.class_fidelity)):
        if args.size is not None and given:
            raise UsageError(f"{flag} compares samples with real images of the training size; leave out --size (or "
                             f"{flag}).")
    if args.condition is not None or prior.condition.kind in MAP_KINDS:
        return sample_conditions(args, prior, state, settings, out, device, progress)
    num = args.num or GRID_IMAGES
    if args.samples_per_condition is not None:
        raise UsageError("--samples-per-condition goes with --condition; use --num for the number of samples.")
    cycle = class_cycle(prior, args.classes)
    reference = input_images(args.fid_ref, prior.vqgan, state) if args.fid_ref else None
    if reference is not None and num < 2:
        raise UsageError("FID needs at least 2 samples; raise --num (thousands for a meaningful value).")
    inception = load_inception(args.inception, device) if reference is not None else None
    judge = class_judge(args, prior, state, device) if args.class_fidelity else None
    generator = torch.Generator(device).manual_seed(args.seed)
    features = FeatureSet()
    shown: list[torch.Tensor] = []
    for start in tqdm(range(0, num, args.batch_size), desc="sampling", dynamic_ncols=True):
        count = min(args.batch_size, num - start)
        condition = sample_labels(cycle, start, count)
        if prior.condition.kind == "coord":  # every pixel's position in the whole picture
            factor = prior.vqgan.downsample_factor
            height, width = settings["grid"]
            condition = coord_map(height * factor, width * factor).expand(count, 1, -1, -1)
        _, images = prior.sample(count, condition, generator=generator, progress=progress, **settings)
        images = images.clamp(-1, 1).float().cpu()
        save_images(images, out, start)
        shown.append(images[:max(0, GRID_IMAGES - start)])
        if inception is not None:
            features.update(inception(images))
        if judge is not None:
            judge.update(images, condition)
    cycle = len(args.classes) if args.classes else prior.num_classes
    columns = cycle if 1 < cycle <= MAX_CLASS_COLUMNS else GRID_COLUMNS
    save_grid(torch.cat(shown), out / "grid.png", nrow=min(columns, num))
    print(f"wrote {num} samples to {out} ({out / 'grid.png'})")
    if reference is None and judge is None:
        return out / "grid.png"
    metrics: dict[str, Any] = {"checkpoint": args.checkpoint, "n_samples": num}
    if reference is not None:
        loader = reference.loader(args.batch_size)
        fid, n_reference = generation_fid(features, loader, inception, total=len(loader))
        metrics.update(reference=reference.description, n_reference=n_reference, fid=fid)
    if judge is not None:
        tests = input_images("test", prior.vqgan, state).loader(args.batch_size)
        batches = reconstruct_batches(prior.vqgan, tqdm(tests, desc="judging reconstructions", dynamic_ncols=True),
                                      device)
        judge.read_reconstructions((reconstructions, labels) for _, labels, _, reconstructions in batches)
        metrics.update(judge.result())
    metrics.update(seed=args.seed, **settings)
    report(metrics, out, "sample metrics")
    return out / "grid.png"


def class_judge(args: argparse.Namespace, prior: VQGANPrior, state: dict, device: torch.device) -> FidelityTally:
    """The judge of ``--class-fidelity``: a classifier of the prior's training data, trained on its train split the
    first time and read from the token cache folder after that."""
    if not prior.class_conditional:
        raise UsageError(f"--class-fidelity measures whether samples show the class asked for, and this prior is "
                         f"{'unconditional' if not prior.conditional else 'conditioned on ' + prior.condition.kind}; "
                         f"it needs a class-conditional prior.")
    data = data_config_of(state["config"])
    settings = JudgeSettings()
    key = cache_key([], {"data": data_settings(data), "judge": dataclasses.asdict(settings)})
    folder = Path(args.token_cache) if args.token_cache else default_cache_folder()

    def datasets() -> tuple[Dataset, Dataset, int, int]:
        train = build_dataset(data, "train")
        return train, build_dataset(data, "test"), num_classes_of(train), data.channels

    judged = cached_judge(folder / f"judge_{data.name}_{key}.pt", datasets, settings, device, data.num_workers)
    if judged["num_classes"] != prior.num_classes:
        raise UsageError(f"the prior draws {prior.num_classes} classes but its data ({data.name}) has "
                         f"{judged['num_classes']}; the checkpoint's data section does not describe its training data.")
    return FidelityTally(judged, device)


def conditioned_inputs_of(spec: str, prior: VQGANPrior, state: dict, limit: int | None, need_images: bool,
                          image_size: int | None = None) -> ConditionedInputs:
    """The inputs ``spec`` names, each with the condition ``prior`` takes (see the module docstring), at
    ``image_size`` (default: the prior's training size)."""
    data = data_config_of(state["config"])
    return conditioned_inputs(spec, data, prior.condition.kind, image_size=image_size or prior.vqgan.resolution,
                              channels=prior.vqgan.in_channels, limit=limit, need_images=need_images)


def repeated_names(names: list[str], times: int) -> list[str]:
    """Output names: ``NAME`` for one sample per input, ``NAME_0 .. NAME_{times-1}`` for several."""
    return names if times == 1 else [f"{name}_{k}" for name in names for k in range(times)]


def prior_condition(prior: VQGANPrior, conditions: torch.Tensor, labels: torch.Tensor,
                    cycle: torch.Tensor | None, start: int) -> torch.Tensor | None:
    """What ``prior.sample`` takes for a batch of inputs: their condition maps, class ids (the inputs' own labels,
    or the ``--class`` ids in turn), or nothing."""
    if prior.class_conditional:
        return labels if cycle is None else sample_labels(cycle, start, len(labels))
    return conditions if prior.conditional else None


def sample_conditions(args: argparse.Namespace, prior: VQGANPrior, state: dict, settings: dict[str, Any],
                      out: Path, device: torch.device, progress: Progress | None) -> Path:
    """``sample --condition``: ``--samples-per-condition`` samples of every condition map, named after it."""
    if args.condition is None:
        raise UsageError(f"this prior is conditioned on {prior.condition.kind} maps: pass them with --condition "
                         f"FOLDER (FOLDER/conditions/NAME.png, and FOLDER/images/NAME.* for a side-by-side with the "
                         f"real image) or --condition test (the test split it was trained with).")
    if not (prior.condition.kind in MAP_KINDS or prior.condition.kind == "coord"):
        raise UsageError(f"--condition gives condition maps, but this prior is conditioned on "
                         f"{prior.condition.kind}; leave --condition out (and use --class for a class).")
    if args.classes is not None or args.fid_ref is not None or args.class_fidelity:
        raise UsageError("--class, --class-fidelity and --fid-ref do not go with --condition: a map-conditioned prior "
                         "samples what its maps say.")
    per_condition = args.samples_per_condition or 1
    height, width = settings["grid"]
    if height != width:
        raise UsageError(f"condition maps are read as squares; --size {args.size[0]} {args.size[1]} is not one. "
                         f"Give one size (--size {args.size[0]}).")
    inputs = conditioned_inputs_of(args.condition, prior, state, args.num, need_images=False,
                                   image_size=height * prior.vqgan.downsample_factor)
    generator = torch.Generator(device).manual_seed(args.seed)
    grid: list[tuple[torch.Tensor, ...]] = []
    shown = 0
    for images, conditions, labels, has_image, names in tqdm(inputs.batches(max(1, args.batch_size // per_condition)),
                                                              desc="sampling", dynamic_ncols=True):
        repeated = conditions.repeat_interleave(per_condition, dim=0)
        _, samples = prior.sample(len(repeated), repeated, generator=generator, progress=progress, **settings)
        samples = samples.clamp(-1, 1).float().cpu()
        save_images(samples, out, names=repeated_names(names, per_condition))
        take = max(0, GRID_CONDITIONS - shown)
        if take:
            reals = torch.where(has_image.view(-1, 1, 1, 1), images, torch.zeros_like(images))
            grid.append((conditions[:take].cpu(), samples[:take * per_condition], reals[:take], has_image[:take]))
            shown += len(grid[-1][0])
    conditions, samples, reals, has_image = (torch.cat(parts) for parts in zip(*grid))
    save_condition_grid(conditions, samples, reals if has_image.any() else None, prior.condition.kind,
                        inputs.num_labels, out / "grid.png")
    print(f"wrote {len(inputs) * per_condition} samples of {len(inputs)} conditions ({inputs.description}) to {out} "
          f"({out / 'grid.png'}: condition | samples{' | real image' if has_image.any() else ''})")
    return out / "grid.png"


def kept_rows(prior: VQGANPrior, keep: float) -> int:
    """How many token rows ``--keep`` keeps: ``keep`` of the grid's height, rounded, and at least one row left to
    sample."""
    height = prior.latent_size[0]
    rows = round(keep * height)
    if rows >= height:
        raise UsageError(f"--keep {keep} keeps all {height} token rows of this prior, leaving nothing to sample; "
                         f"use a value below {(height - 0.5) / height:.3f}.")
    return rows


def cmd_complete(args: argparse.Namespace, loaded: LoadedPrior | None = None, progress: Progress | None = None) -> Path:
    """``complete``; returns the grid picture's path. ``progress`` see :meth:`transformer.VQGANPrior.sample`."""
    out = output_folder(args.out)
    model = loaded_prior(args, loaded)
    prior, state, device = model.prior, model.state, model.device
    settings = sampling_settings(prior, state, args)
    cycle = class_cycle(prior, args.classes) if args.classes is not None else None
    rows = kept_rows(prior, args.keep)
    kept = rows * prior.latent_size[1]
    per_input = args.samples_per_input
    inputs = conditioned_inputs_of(args.input, prior, state, args.num, need_images=True)
    if prior.class_conditional and cycle is None and inputs.num_classes == 0:
        raise UsageError(f"this prior is class-conditional and the inputs ({inputs.description}) have no class "
                         f"labels: pass --class C (one id, or several used in turn).")
    generator = torch.Generator(device).manual_seed(args.seed)
    grid: list[tuple[torch.Tensor, ...]] = []
    done = 0
    for images, conditions, labels, _, names in tqdm(inputs.batches(max(1, args.batch_size // per_input)),
                                                     desc="completing", dynamic_ncols=True):
        indices = prior.encode(images.to(device))
        condition = prior_condition(prior, conditions, labels, cycle, done)
        repeated = None if condition is None else condition.repeat_interleave(per_input, dim=0)
        given = indices[:, :kept].repeat_interleave(per_input, dim=0)
        _, completions = prior.sample(len(given), repeated, given=given, generator=generator, progress=progress,
                                      **settings)
        completions = completions.clamp(-1, 1).float().cpu()
        save_images(completions, out, names=repeated_names(names, per_input))
        take = max(0, GRID_CONDITIONS - done)
        if take:
            kept_part = prior.decode(indices[:take]).clamp(-1, 1).float().cpu()
            kept_part[..., rows * prior.vqgan.downsample_factor:, :] = 0.0  # the part to be sampled, grey
            grid.append((images[:take], kept_part, completions[:take * per_input]))
        done += len(images)
    originals, kept_parts, completions = (torch.cat(parts) for parts in zip(*grid))
    pictures = torch.cat([originals[:, None], kept_parts[:, None],
                          completions.view(len(originals), per_input, *completions.shape[1:])], dim=1)
    save_grid(pictures.flatten(0, 1), out / "grid.png", nrow=pictures.shape[1])
    print(f"wrote {done * per_input} completions of {done} inputs ({inputs.description}), keeping the first {rows} "
          f"of {prior.latent_size[0]} token rows, to {out} ({out / 'grid.png'}: input | kept part | completions)")
    return out / "grid.png"


def load_lpips(vgg: str | None, heads: str | None, device: torch.device) -> LPIPS:
    try:
        return LPIPS(vgg, heads).to(device)
    except LPIPSWeightsError as err:
        raise UsageError(f"{err}\nFor generate.py: pass the files with --lpips-vgg FILE and --lpips-heads FILE, "
                         f"or leave out --lpips.") from err


def cmd_reconstruct(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    out = output_folder(args.out)
    vqgan, state = load_vqgan(args.checkpoint, device)
    images = input_images(args.input, vqgan, state, args.num)
    if args.fid and len(images.dataset) < 2:
        raise UsageError("rFID needs at least 2 images; use more images (--num).")
    inception = load_inception(args.inception, device) if args.fid else None
    lpips = load_lpips(args.lpips_vgg, args.lpips_heads, device) if args.lpips else None
    metrics = ReconstructionMetrics(vqgan.codebook_size, inception, lpips)
    loader = images.loader(args.batch_size)
    shown: list[tuple[torch.Tensor, torch.Tensor]] = []
    batches = reconstruct_batches(vqgan, loader, device)
    for originals, _, indices, reconstructions in tqdm(batches, desc="reconstructing", total=len(loader),
                                                       dynamic_ncols=True):
        save_images(torch.cat([originals, reconstructions], dim=-1), out, metrics.count)
        if metrics.count < GRID_COLUMNS:
            shown.append((originals, reconstructions))
        metrics.update(originals, reconstructions, indices)
    originals, reconstructions = (torch.cat(parts)[:GRID_COLUMNS] for parts in zip(*shown))
    save_reconstruction_grid(originals, reconstructions, out / "grid.png")
    report({"checkpoint": args.checkpoint, "input": images.description, **metrics.result()}, out,
           "reconstruction metrics")


def encode_tokens(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    out = output_file(args.out, ".npy")
    vqgan, state = load_vqgan(args.checkpoint, device)
    images = input_images(args.input, vqgan, state, args.num)
    all_indices, all_labels = [], []
    for batch, labels in tqdm(images.loader(args.batch_size), desc="encoding", dynamic_ncols=True):
        all_indices.append(vqgan.encode_to_indices(batch.to(device)).cpu())
        all_labels.append(labels)
    indices = torch.cat(all_indices).to(torch.int32).numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, indices)
    print(f"wrote {out}: {indices.shape[0]} token grids of {indices.shape[1]}x{indices.shape[2]} codes "
          f"(int32, 0..{vqgan.codebook_size - 1})")
    if images.num_classes > 0:
        labels_path = out.with_suffix(".labels.npy")
        np.save(labels_path, torch.cat(all_labels).long().numpy())
        print(f"wrote {labels_path}: their class labels")


def read_tokens(path: Path, vqgan: VQGAN) -> torch.Tensor:
    """Code indices [N, h, w] from a .npy file of [N, h, w] or [N, h*w] integers, checked against ``vqgan``."""
    if not path.is_file():
        raise UsageError(f"token file '{path}' does not exist; write one with `generate.py tokens --out FILE.npy`.")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise UsageError(f"'{path}' is not a .npy file of integer code grids, so it cannot be decoded. Pass a file "
                         f"written by `generate.py tokens --out FILE.npy`.") from err
    if not isinstance(array, np.ndarray):
        raise UsageError(f"'{path}' is an .npz archive, not a .npy array of code grids; pass the .npy file that "
                         f"`generate.py tokens --out FILE.npy` wrote.")
    h, w = vqgan.latent_size
    if not np.issubdtype(array.dtype, np.integer) or array.ndim not in (2, 3) or array.shape[1:] not in ((h, w),
                                                                                                     (h * w,)):
        raise UsageError(f"'{path}' holds {array.dtype} {array.shape}, but this VQGAN needs integer code grids "
                         f"[N, {h}, {w}] (or [N, {h * w}]).")
    if array.shape[0] == 0:
        raise UsageError(f"'{path}' holds no token grids (shape {array.shape}); pass a file with at least one.")
    if array.size and (array.min() < 0 or array.max() >= vqgan.codebook_size):
        raise UsageError(f"'{path}' holds codes in [{array.min()}, {array.max()}], but this VQGAN has "
                         f"{vqgan.codebook_size} codes; decode with the checkpoint that wrote the tokens.")
    return torch.from_numpy(array.astype(np.int64)).view(-1, h, w)


def decode_tokens(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    out = output_folder(args.out)
    vqgan, _ = load_vqgan(args.checkpoint, device)
    check_reads_images(vqgan)
    indices = read_tokens(Path(args.input), vqgan)[:args.num]
    shown: list[torch.Tensor] = []
    batches = decode_batches(vqgan, indices, args.batch_size, device)
    total = math.ceil(len(indices) / args.batch_size)
    for i, images in enumerate(tqdm(batches, desc="decoding", total=total, dynamic_ncols=True)):
        start = i * args.batch_size
        save_images(images, out, start)
        shown.append(images[:max(0, GRID_IMAGES - start)])
    save_grid(torch.cat(shown), out / "grid.png", nrow=min(GRID_COLUMNS, len(indices)))
    print(f"wrote {len(indices)} images to {out}")


def cmd_tokens(args: argparse.Namespace) -> None:
    (decode_tokens if args.decode else encode_tokens)(args)


def cmd_visualize(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    out = output_folder(args.out)
    vqgan, prior, state = load_any(args.checkpoint, device)
    metrics_csv = Path(args.run_dir) / "metrics.csv" if args.run_dir else None
    if metrics_csv is not None and not metrics_csv.is_file():
        raise UsageError(f"--run-dir {args.run_dir} has no metrics.csv; pass a run folder written by "
                         f"train_vqgan.py or train_transformer.py.")
    if metrics_csv is not None:
        read_metrics(metrics_csv)  # a malformed file is reported before any picture is drawn
    images = input_images(args.input, vqgan, state, args.num)
    loader = images.loader(args.batch_size)
    written = tokenizer_pictures(vqgan, tqdm(loader, desc="encoding", dynamic_ncols=True), device, out)
    if prior is not None and prior.condition.kind in MAP_KINDS:
        print(f"note: this prior samples from {prior.condition.kind} maps; draw its samples with generate.py sample "
              f"--condition test (or a folder of maps).")
    elif prior is not None:
        generator = torch.Generator(device).manual_seed(args.seed)
        size = prior.vqgan.resolution  # a coordinate-conditioned prior draws whole pictures
        coords = coord_map(size, size) if prior.condition.kind == "coord" else None
        written.append(prior_samples_picture(prior, out, args.per_class, generator, coords,
                                             **sampling_settings(prior, state, args)))
    if metrics_csv is not None:
        curves = training_curves_picture(metrics_csv.parent, out)
        if curves is None:
            print(f"note: {metrics_csv} has no values yet; no training curves drawn.")
        else:
            written.append(curves)
    print("wrote " + ", ".join(str(path) for path in written))


def cmd_import_taming(args: argparse.Namespace) -> None:
    print("\n".join(import_taming_checkpoint(args.checkpoint, args.out, args.resolution, args.config, args.force)))


DEMO_EXAMPLES = 8  # test images (and condition maps) the demo page offers


def cmd_demo(args: argparse.Namespace) -> None:
    try:
        import gradio  # noqa: F401  (checked before the prior is loaded)
    except ImportError as err:
        raise UsageError(demo.INSTALL_HINT) from err
    out = output_folder(args.out)
    device = pick_device(args.device)
    loaded = LoadedPrior(*load_prior(args.checkpoint, device), device)
    page = demo.build_page(demo_model(args, loaded, out / "examples"), functools.partial(run_demo_command, loaded),
                           out)
    print(f"the demo page is at http://{args.host}:{args.port} (Ctrl+C stops it); runs go to {out}")
    page.queue().launch(server_name=args.host, server_port=args.port, allowed_paths=[str(out.resolve())],
                        show_error=True, css=demo.PAGE_CSS)


def demo_model(args: argparse.Namespace, loaded: LoadedPrior, examples: Path) -> demo.DemoModel:
    """What the page offers for this prior: its classes, sizes, sampling defaults and test-split examples."""
    prior, state = loaded.prior, loaded.state
    defaults = sampling_settings(prior, state, argparse.Namespace())
    training_size = prior.latent_size[0] * prior.vqgan.downsample_factor
    square = prior.latent_size[0] == prior.latent_size[1]
    sizes = [training_size * k // 2 for k in range(2, 9)] if square else [training_size]
    sizes = [size for size in sizes if size % prior.vqgan.downsample_factor == 0]
    names = export_examples(loaded, examples)
    kind = prior.condition.kind
    classes = [str(label) for label in range(prior.num_classes)] if prior.class_conditional else []
    if names and classes:
        named = class_names_of(build_dataset(data_config_of(state["config"]), "test"))
        classes = named if len(named) == len(classes) else classes
    condition = {"none": "unconditional", "class": f"class-conditional ({prior.num_classes} classes)",
                 "coord": "coordinate-conditioned"}.get(kind, f"{kind}-conditioned")
    summary = (f"a {condition} prior over {prior.latent_size[0]}x{prior.latent_size[1]} codes, trained on "
               f"{training_size}x{training_size} images")
    return demo.DemoModel(args.checkpoint, summary, kind, kind in MAP_KINDS, classes, prior.conditional, sizes,
                          {"temperature": defaults["temperature"], "top_k": defaults["top_k"] or 0,
                           "top_p": defaults["top_p"] or 1.0, "cfg_scale": defaults["cfg_scale"]},
                          examples if names else None, names, args.device)


def export_examples(loaded: LoadedPrior, folder: Path) -> list[str]:
    """The first test images of the prior's data (and their condition maps) as files the commands read:
    ``folder/images/NAME.png`` and ``folder/conditions/NAME.png``. None when the data is not on this machine."""
    prior, state = loaded.prior, loaded.state
    try:
        inputs = conditioned_inputs_of("test", prior, state, DEMO_EXAMPLES, need_images=True)
        images, conditions, _, _, names = next(inputs.batches(DEMO_EXAMPLES))
    except (DataError, ConfigError) as err:
        print(f"note: the page offers no examples, as the prior's test data cannot be read here ({err})")
        return []
    save_images(images, folder / "images", names=names)
    if prior.condition.kind in ("segmentation", "depth"):
        (folder / "conditions").mkdir(parents=True, exist_ok=True)
        for name, condition in zip(names, conditions):
            save_condition_map(condition, prior.condition.kind, folder / "conditions" / f"{name}.png")
    return list(names)


def save_condition_map(condition: torch.Tensor, kind: str, path: Path) -> None:
    """A segmentation map [1,H,W] as an 8-bit PNG of its labels, a depth map in [-1,1] as a 16-bit PNG."""
    if kind == "segmentation":
        Image.fromarray(condition[0].numpy().astype(np.uint8), mode="L").save(path)
    else:
        depth = ((condition[0].clamp(-1, 1) + 1) * 65535 / 2).round().numpy().astype(np.uint16)
        Image.fromarray(depth).save(path)


def run_demo_command(loaded: LoadedPrior, argv: list[str], every: int, preview: demo.Preview) -> Path:
    """Run ``generate.py`` with ``argv`` (sample or complete) on the loaded prior, showing the grid every ``every``
    tokens; errors the command line would report come back as the page's RequestError."""
    refusal = io.StringIO()
    try:
        with contextlib.redirect_stderr(refusal):
            args = build_parser().parse_args(argv)
    except SystemExit as err:
        raise demo.RequestError(refusal.getvalue().strip().splitlines()[-1]) from err
    if args.command not in ("sample", "complete"):
        raise demo.RequestError(f"the page runs sample and complete, not {args.command}.")
    try:
        with torch.no_grad():
            return args.run(args, loaded, partial_grids(loaded.prior, every, preview))
    except (DataError, UsageError, ConfigError) as err:
        raise demo.RequestError(str(err)) from err


def partial_grids(prior: VQGANPrior, every: int, preview: demo.Preview) -> Progress:
    """A sampling ``progress`` that decodes the codes drawn so far every ``every`` tokens (and at the end) and
    passes the grid to ``preview``, the codes still to come in grey."""
    factor = prior.vqgan.downsample_factor

    def progress(codes: torch.Tensor, filled: int) -> None:
        total = codes[0].numel()
        if filled % every and filled != total:
            return
        images = decode_grid(prior.vqgan, codes, prior.latent_size).clamp(-1, 1).float().cpu()
        drawn = (torch.arange(total) < filled).view(1, 1, *codes.shape[1:]).float()
        images = images * drawn.repeat_interleave(factor, -2).repeat_interleave(factor, -1)
        preview(np.asarray(grid_picture(images, nrow=min(len(images), GRID_COLUMNS))), filled, total)

    return progress


def cli_number(parse: Callable[[str], int | float], minimum: float | None = None, exclusive: bool = False,
               maximum: float | None = None) -> Callable[[str], int | float]:
    """An argparse ``type``: ``parse`` the text, then require a finite number within the 64-bit range and
    ``[minimum, maximum]`` (``minimum`` excluded when ``exclusive``)."""
    def convert(text: str) -> int | float:
        try:
            value = check_number("the value", parse(text))
        except (ValueError, ConfigError) as err:
            kind = "an integer" if parse is int else "a finite number"
            raise argparse.ArgumentTypeError(f"expected {kind} within +-9.2e18, got {text!r}") from err
        low_ok = minimum is None or (value > minimum if exclusive else value >= minimum)
        if not low_ok or (maximum is not None and value > maximum):
            low = "" if minimum is None else f"{'above' if exclusive else 'at least'} {minimum:g}"
            high = "" if maximum is None else f"at most {maximum:g}"
            raise argparse.ArgumentTypeError(f"must be {' and '.join(filter(None, (low, high)))}, got {text}")
        return value

    convert.__name__ = parse.__name__  # argparse names the type in its messages
    return convert


positive_int = cli_number(int, minimum=1)
non_negative_int = cli_number(int, minimum=0)
any_int = cli_number(int)
finite_float = cli_number(float)
positive_float = cli_number(float, minimum=0, exclusive=True)
probability = cli_number(float, minimum=0, exclusive=True, maximum=1)


def add_common(parser: argparse.ArgumentParser, checkpoint_help: str, batch_size: int = 64) -> None:
    parser.add_argument("--checkpoint", required=True, help=checkpoint_help)
    parser.add_argument("--batch-size", type=positive_int, default=batch_size, help="images per batch")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")


def add_input(parser: argparse.ArgumentParser, default: str | None = None, num_default: int | None = None,
              also: str = "") -> None:
    parser.add_argument("--input", required=default is None, default=default,
                        help="'test' (the test split the checkpoint was trained with), a YAML config (test split "
                             "of its data section) or a folder of images" + (f"; default {default}" if default else "")
                             + also)
    parser.add_argument("--num", type=positive_int, default=num_default,
                        help="use only the first N images" + (f" (default {num_default})" if num_default else ""))


def add_sampling(parser: argparse.ArgumentParser) -> None:
    """The sampling flags: temperature, top-k, top-p, guidance, compile and seed."""
    parser.add_argument("--temperature", type=positive_float, default=None,
                        help="softmax temperature (default: the checkpoint's sample.temperature)")
    parser.add_argument("--top-k", type=non_negative_int, default=None,
                        help="keep the k most likely codes; 0 = off (default: the checkpoint's sample.top_k)")
    parser.add_argument("--top-p", type=probability, default=None,
                        help="nucleus sampling mass; 1 = off (default: the checkpoint's sample.top_p)")
    parser.add_argument("--cfg-scale", type=finite_float, default=None,
                        help="classifier-free guidance scale, 1 = off (default: the checkpoint's sample.cfg_scale)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="decode with the one-token step under torch.compile, CUDA graphs on CUDA (default: "
                             "the checkpoint's sample.compile)")
    parser.add_argument("--window-caches", type=non_negative_int, default=None,
                        help="beyond the training size: KV caches kept for windows that come back in a later row; "
                             "lower it if memory runs out (default: the checkpoint's sample.window_caches)")
    parser.add_argument("--seed", type=any_int, default=0, help="random seed; the same seed gives the same images")


def build_parser() -> argparse.ArgumentParser:
    parser = StrictParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    stage1 = "stage-1 checkpoint (runs/<name>/checkpoints/last.pt of train_vqgan.py)"

    sample = commands.add_parser("sample", help="sample images from a stage-2 prior")
    add_common(sample, "stage-2 checkpoint (written by train_transformer.py)")
    sample.add_argument("--num", type=positive_int, default=None,
                        help=f"number of samples (default {GRID_IMAGES}); with --condition, use only the first N "
                             f"conditions (default all)")
    sample.add_argument("--out", required=True, help="folder for 000000.png, ..., grid.png (and metrics.json)")
    sample.add_argument("--class", dest="classes", type=non_negative_int, nargs="+", default=None,
                        help="class id(s): one id for every sample, or several used in turn (sample i gets "
                             "the (i mod k)-th id). Default for a class-conditional prior: 0, 1, ..., C-1 in turn")
    sample.add_argument("--condition", default=None,
                        help="condition maps of a segmentation/depth/low-res prior: 'test' or a FOLDER "
                             "(FOLDER/conditions/NAME.png [+ FOLDER/images/NAME.*], or maps directly in FOLDER); "
                             "writes OUT/NAME.png per map")
    sample.add_argument("--samples-per-condition", type=positive_int, default=None,
                        help="samples of each condition map (default 1; several are written as OUT/NAME_k.png)")
    sample.add_argument("--size", type=positive_int, nargs="+", default=None, metavar="PIXELS",
                        help="height and width of the samples in pixels (one number: a square), multiples of the "
                             "VQGAN's downsampling, at least the prior's training size (the default); larger samples "
                             "slide the training window over the image, with condition maps read at this size")
    add_sampling(sample)
    sample.add_argument("--fid-ref", default=None,
                        help="also compute FID against these real images: 'test', a YAML config or a folder")
    sample.add_argument("--inception", default=None, help="FID Inception weights file (default: found locally)")
    sample.add_argument("--class-fidelity", action="store_true",
                        help="also measure how often the samples show the class asked for, and how often they "
                             "nearly copy a training image, with a classifier of the prior's training data (trained "
                             "on its train split the first time, then kept in --token-cache); use --num 1000 or more")
    sample.add_argument("--token-cache", default=None,
                        help="folder of cached results, here the class judge (default: $VQGAN_TOKEN_CACHE, else "
                             "$XDG_CACHE_HOME/vqgan/tokens, else ~/.cache/vqgan/tokens)")
    sample.set_defaults(run=cmd_sample)

    complete = commands.add_parser("complete", help="keep the top of each image's token grid and sample the rest")
    add_common(complete, "stage-2 checkpoint (written by train_transformer.py)")
    add_input(complete, also="; for a segmentation/depth prior a folder holds images/ and conditions/")
    complete.add_argument("--out", required=True, help="folder for NAME.png per input (NAME_k.png for several) "
                                                       "and grid.png")
    complete.add_argument("--keep", type=cli_number(float, minimum=0, maximum=1), default=0.5,
                          help="fraction of the token rows to keep, from the top (default 0.5)")
    complete.add_argument("--samples-per-input", type=positive_int, default=1,
                          help="completions of each input (default 1)")
    complete.add_argument("--class", dest="classes", type=non_negative_int, nargs="+", default=None,
                          help="class-conditional prior: the class id(s) to complete with, used in turn (default: "
                               "the inputs' own labels)")
    add_sampling(complete)
    complete.set_defaults(run=cmd_complete)

    reconstruct = commands.add_parser("reconstruct", help="reconstruct images and measure the tokenizer")
    add_common(reconstruct, stage1)
    add_input(reconstruct)
    reconstruct.add_argument("--out", required=True,
                             help="folder for 000000.png (original | reconstruction), grid.png, metrics.json")
    reconstruct.add_argument("--fid", action="store_true", help="add rFID (Inception features, reconstructions "
                                                                "vs originals)")
    reconstruct.add_argument("--inception", default=None, help="FID Inception weights file (default: found locally)")
    reconstruct.add_argument("--lpips", action="store_true",
                             help="add LPIPS (needs the VGG16 and LPIPS weights; an error says how to get them)")
    reconstruct.add_argument("--lpips-vgg", default=None, help="VGG16 ImageNet weights file for --lpips")
    reconstruct.add_argument("--lpips-heads", default=None, help="LPIPS linear-head weights (vgg.pth) for --lpips")
    reconstruct.set_defaults(run=cmd_reconstruct)

    tokens = commands.add_parser("tokens", help="export code indices to .npy, or decode them back (--decode)")
    add_common(tokens, stage1)
    add_input(tokens, also="; with --decode, the FILE.npy to decode")
    tokens.add_argument("--out", required=True, help="FILE.npy to write, or with --decode a folder of PNGs")
    tokens.add_argument("--decode", action="store_true",
                        help="decode --input FILE.npy ([N, h, w] integer codes) into PNGs in --out")
    tokens.set_defaults(run=cmd_tokens)

    visualize = commands.add_parser("visualize", help="draw reconstructions, codebook usage, token maps, "
                                                      "samples by class and training curves")
    add_common(visualize, "stage-1 or stage-2 checkpoint (a stage-2 one adds sample grids by class)")
    add_input(visualize, default="test", num_default=1000)
    visualize.add_argument("--out", required=True, help="folder for the PNGs")
    visualize.add_argument("--run-dir", default=None, help="run folder whose metrics.csv to plot")
    visualize.add_argument("--per-class", type=positive_int, default=8, help="samples per class row (stage 2)")
    visualize.add_argument("--seed", type=any_int, default=0, help="random seed of the samples")
    visualize.set_defaults(run=cmd_visualize)

    taming = commands.add_parser("import-taming", help="convert a taming-transformers checkpoint (.ckpt): a VQGAN "
                                                       "into a stage-1 checkpoint, a transformer into a stage-2 one")
    taming.add_argument("--checkpoint", required=True,
                        help="taming checkpoint, e.g. last.ckpt of vqgan_imagenet_f16_16384 or cin_transformer (read "
                             "without running pickled code; Lightning is not needed)")
    taming.add_argument("--out", required=True, help="checkpoint to write; for a VQGAN, the LPIPS weights stored in "
                                                     "the taming file go beside it (OUT.lpips_vgg.pth, "
                                                     "OUT.lpips_heads.pth)")
    taming.add_argument("--resolution", type=positive_int, default=None,
                        help="image size the model is used at (default: the --config's, else 256)")
    taming.add_argument("--config", default=None,
                        help="taming's model.yaml for this checkpoint: cross-checks a VQGAN's architecture read "
                             "from the weights (optional); required for a transformer (its condition stage and "
                             "attention heads)")
    taming.add_argument("--force", action="store_true", help="overwrite existing output files")
    taming.set_defaults(run=cmd_import_taming)

    page = commands.add_parser("demo", help="a local web page (Gradio) to sample, guide, condition and complete "
                                            "with a stage-2 prior")
    add_common(page, "stage-2 checkpoint (written by train_transformer.py)")
    page.add_argument("--host", default="127.0.0.1", help="address to serve on (default 127.0.0.1: this machine "
                                                          "only; 0.0.0.0 serves the network)")
    page.add_argument("--port", type=positive_int, default=7860, help="port (default 7860)")
    page.add_argument("--out", default="runs/demo", help="folder of the page's runs, one numbered folder each, "
                                                         "and its examples (default runs/demo)")
    page.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], None] = args.run
    with clean_exit(DataError, UsageError, InceptionWeightsError, LPIPSWeightsMismatchError, MetricsFileError):
        with torch.no_grad():
            run(args)


if __name__ == "__main__":
    main()

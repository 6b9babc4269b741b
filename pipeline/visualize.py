"""Pictures of a trained tokenizer and prior, written as PNGs into one folder.

* ``reconstructions.png``: originals (top row) above their reconstructions;
* ``codebook_usage.png``: how often each code is used over the images, sorted from most used;
* ``token_maps.png``: images beside their code grids drawn in colour (one colour per code);
* ``samples_by_class.png``: prior samples, row ``i`` showing class ``i`` (``samples.png`` for an
  unconditional prior);
* ``training_curves.png``: every column of a run's ``metrics.csv`` against step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from pipeline.evaluate import reconstruct_batches
from transformer import VQGANPrior
from utils.metrics import CodebookStats
from utils.plots import plot_code_histogram, plot_metrics_overview, plot_token_maps, save_grid, save_reconstruction_grid
from vqgan import VQGAN

SHOWN_RECONSTRUCTIONS = 8
SHOWN_TOKEN_MAPS = 6
MAX_CLASS_ROWS = 16
UNCONDITIONAL_ROWS = 4


def tokenizer_pictures(vqgan: VQGAN, batches: Iterable, device: torch.device, out_dir: Path) -> list[Path]:
    """Reconstructions, codebook usage (over every image of ``batches``) and token maps."""
    codes = CodebookStats(vqgan.codebook_size)
    shown: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for images, _, indices, reconstructions in reconstruct_batches(vqgan, batches, device):
        codes.update(indices)
        if sum(len(part[0]) for part in shown) < max(SHOWN_RECONSTRUCTIONS, SHOWN_TOKEN_MAPS):
            shown.append((images, indices, reconstructions))
    images, indices, reconstructions = (torch.cat(parts) for parts in zip(*shown))
    paths = [out_dir / "reconstructions.png", out_dir / "codebook_usage.png", out_dir / "token_maps.png"]
    save_reconstruction_grid(images[:SHOWN_RECONSTRUCTIONS], reconstructions[:SHOWN_RECONSTRUCTIONS], paths[0])
    plot_code_histogram(codes.counts, paths[1])
    plot_token_maps(images[:SHOWN_TOKEN_MAPS], indices[:SHOWN_TOKEN_MAPS], vqgan.codebook_size, paths[2])
    return paths


def prior_samples_picture(prior: VQGANPrior, out_dir: Path, per_row: int, generator: torch.Generator,
                          **sampling: float | int | None) -> Path:
    """A grid of samples: one row per class (the first ``MAX_CLASS_ROWS`` classes) or a few unconditional rows."""
    if prior.class_conditional:
        rows = min(prior.num_classes, MAX_CLASS_ROWS)
        labels = torch.arange(rows).repeat_interleave(per_row)
        path = out_dir / "samples_by_class.png"
    else:
        rows, labels, path = UNCONDITIONAL_ROWS, None, out_dir / "samples.png"
    _, images = prior.sample(rows * per_row, labels, generator=generator, **sampling)
    save_grid(images, path, nrow=per_row)
    return path


def training_curves_picture(run_dir: Path, out_dir: Path) -> Path | None:
    """``training_curves.png`` from ``run_dir/metrics.csv``; None when the file has no values yet."""
    path = out_dir / "training_curves.png"
    return path if plot_metrics_overview(run_dir / "metrics.csv", path) else None

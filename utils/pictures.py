"""Pictures: image grids and matplotlib plots of training curves, code histograms and token maps, as PNGs.

``generate.py visualize`` draws with these the pictures of a trained tokenizer
(:func:`vqgan.pictures.tokenizer_pictures`), of a prior (:func:`transformer.pictures.prior_samples_picture`)
and ``training_curves.png``: every column of a run's ``metrics.csv`` against step.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from utils.logging import read_metrics  # noqa: E402

MAX_CLASS_ROWS = 16


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B,C,H,W] in [-1,1] -> uint8 [B,H,W,3] (grayscale repeated)."""
    images = images.detach().float().cpu().clamp(-1, 1)
    if images.shape[1] == 1:
        images = images.repeat(1, 3, 1, 1)
    return ((images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    """[B,1,H,W] grayscale repeated to [B,3,H,W]; RGB images as they are (so both can share a grid)."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def label_pictures(labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Label maps [B,1,H,W] -> RGB pictures [B,3,H,W] in [-1,1]: black for label 0 (background), and a fixed,
    well-spread hue (golden-ratio steps around the colour wheel) for every other label."""
    hues = (torch.arange(num_labels, dtype=torch.float32) * 0.618034) % 1.0
    sector = hues[:, None] * 6 - torch.tensor([5.0, 3.0, 1.0])  # hue -> RGB at full saturation and value
    palette = (1 - (sector % 6 - 3).abs().sub(1).clamp(0, 1)) * 0.85 + 0.15
    palette[0] = 0.0
    colours = palette.to(labels.device)[labels[:, 0].long()]  # [B,H,W,3]
    return colours.permute(0, 3, 1, 2).mul(2).sub(1)


def image_grid(images: torch.Tensor, nrow: int, padding: int = 2) -> Image.Image:
    """Tile a batch of [-1,1] images into ``nrow`` columns with white padding."""
    pixels = to_uint8(images)
    count, height, width, _ = pixels.shape
    rows = math.ceil(count / nrow)
    grid = np.full((rows * (height + padding) + padding, nrow * (width + padding) + padding, 3), 255, np.uint8)
    for i, image in enumerate(pixels):
        top = padding + (i // nrow) * (height + padding)
        left = padding + (i % nrow) * (width + padding)
        grid[top:top + height, left:left + width] = image
    return Image.fromarray(grid)


def grid_picture(images: torch.Tensor, nrow: int, min_size: int = 256) -> Image.Image:
    """An image grid, upscaled with nearest neighbours so small images stay visible."""
    grid = image_grid(images, nrow)
    scale = max(1, math.ceil(min_size / max(grid.size)))
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)
    return grid


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, min_size: int = 256) -> None:
    """Save :func:`grid_picture` of ``images``."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid_picture(images, nrow, min_size).save(path)


def save_reconstruction_grid(inputs: torch.Tensor, reconstructions: torch.Tensor, path: str | Path) -> None:
    """Inputs in the top row(s), their reconstructions directly below."""
    save_grid(torch.cat([inputs, reconstructions]), path, nrow=inputs.shape[0])


def plot_training_curves(metrics_csv: str | Path, out_dir: str | Path,
                         groups: dict[str, Sequence[str]]) -> list[Path]:
    """One PNG per group of columns (e.g. losses, codebook usage) against step."""
    metrics = read_metrics(metrics_csv)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    steps = metrics.get("step", [])
    for title, columns in groups.items():
        present = [c for c in columns if c in metrics and any(math.isfinite(v) for v in metrics[c])]
        if not present or len(steps) < 1:
            continue
        fig, axes = plt.subplots(len(present), 1, figsize=(7, 2.2 * len(present)), sharex=True, squeeze=False)
        for ax, column in zip(axes[:, 0], present):
            ax.plot(steps, metrics[column], lw=1.2)
            ax.set_ylabel(column)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        fig.suptitle(title)
        fig.tight_layout()
        path = out_dir / f"{title.replace(' ', '_')}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def plot_code_histogram(counts: torch.Tensor, path: str | Path, title: str = "codebook usage") -> None:
    """Bar plot of code counts sorted from most to least used."""
    sorted_counts = torch.sort(counts.float().cpu(), descending=True).values.numpy()
    used = int((sorted_counts > 0).sum())
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(np.arange(len(sorted_counts)), sorted_counts, width=1.0)
    ax.set_xlabel("code rank")
    ax.set_ylabel("count")
    ax.set_title(f"{title}: {used}/{len(sorted_counts)} codes used")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_token_maps(images: torch.Tensor, indices: torch.Tensor, codebook_size: int, path: str | Path) -> None:
    """Each image beside its index grid drawn in colour (one colour per code)."""
    pixels = to_uint8(images)
    count = len(pixels)
    fig, axes = plt.subplots(count, 2, figsize=(4, 2 * count), squeeze=False)
    for i in range(count):
        axes[i, 0].imshow(pixels[i])
        axes[i, 1].imshow(indices[i].cpu().numpy(), cmap="nipy_spectral", vmin=0, vmax=codebook_size - 1,
                          interpolation="nearest")
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_title("image")
    axes[0, 1].set_title("codes")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def save_images(images: torch.Tensor, folder: str | Path, start: int = 0,
                names: Sequence[str] | None = None) -> list[Path]:
    """Save each [-1,1] image at its own resolution as ``folder/{start + i:06d}.png``, or as ``folder/NAME.png``
    for the given ``names`` (relative paths without the extension; grayscale stays 'L')."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(images)
    grayscale = images.shape[1] == 1
    paths = []
    for i, image in enumerate(pixels):
        path = folder / f"{names[i] if names is not None else f'{start + i:06d}'}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[:, :, 0] if grayscale else image).save(path)
        paths.append(path)
    return paths


def plot_metrics_overview(metrics_csv: str | Path, path: str | Path, ncols: int = 3) -> list[str]:
    """Every column of a run's metrics.csv against step, one small panel each, in a single PNG.

    Columns without a finite value (e.g. ``p_loss`` when the perceptual loss is off) are skipped.
    Returns the columns drawn; nothing is written when there are none.
    """
    metrics = read_metrics(metrics_csv)
    steps = metrics.get("step", [])
    columns = [c for c, values in metrics.items()
               if c != "step" and any(math.isfinite(v) for v in values)]
    if not columns or not steps:
        return []
    rows = math.ceil(len(columns) / ncols)
    fig, axes = plt.subplots(rows, ncols, figsize=(3.6 * ncols, 2.4 * rows), squeeze=False)
    for ax, column in zip(axes.flat, columns):
        ax.plot(steps, metrics[column], lw=1.2)
        ax.set_title(column, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(columns):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return columns


def class_rows(num_classes: int, num_images: int) -> tuple[torch.Tensor, int]:
    """Labels for a grid of at most ``num_images`` samples with one class per row (the first classes when there
    are more classes than images), and the row length."""
    rows = max(1, min(num_classes, num_images, MAX_CLASS_ROWS))
    per_row = max(1, num_images // rows)
    return torch.arange(rows).repeat_interleave(per_row), per_row


def training_curves_picture(run_dir: Path, out_dir: Path) -> Path | None:
    """``training_curves.png`` from ``run_dir/metrics.csv``; None when the file has no values yet."""
    path = out_dir / "training_curves.png"
    return path if plot_metrics_overview(run_dir / "metrics.csv", path) else None

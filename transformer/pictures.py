"""Pictures of a prior: ``samples_by_class.png`` for ``generate.py visualize`` (row ``i`` showing class ``i``,
``samples.png`` for an unconditional prior) and the condition | samples | real image grids of conditional
sampling and completion."""

from __future__ import annotations

from pathlib import Path

import torch

from transformer.prior import VQGANPrior
from utils.pictures import MAX_CLASS_ROWS, as_rgb, label_pictures, save_grid

UNCONDITIONAL_ROWS = 4


def prior_samples_picture(prior: VQGANPrior, out_dir: Path, per_row: int, generator: torch.Generator,
                          coords: torch.Tensor | None = None, **sampling: float | int | None) -> Path:
    """A grid of samples of ``prior``: one row per class (the first ``MAX_CLASS_ROWS`` classes) or a few
    unconditional rows (for a coordinate-conditioned prior, all with the coordinate map ``coords`` [1, H, W]). Not
    for a prior conditioned on maps, whose samples need them."""
    if prior.class_conditional:
        rows = min(prior.num_classes, MAX_CLASS_ROWS)
        labels = torch.arange(rows).repeat_interleave(per_row)
        path = out_dir / "samples_by_class.png"
    else:
        rows, labels, path = UNCONDITIONAL_ROWS, None, out_dir / "samples.png"
    if coords is not None:
        labels = coords.expand(rows * per_row, 1, -1, -1)
    _, images = prior.sample(rows * per_row, labels, generator=generator, **sampling)
    save_grid(images, path, nrow=per_row)
    return path


def condition_pictures(maps: torch.Tensor, kind: str, num_labels: int = 0) -> torch.Tensor:
    """Condition maps as pictures in [-1, 1]: label maps in colour, coordinates as a ramp, depth and low-res images
    as they are."""
    if kind == "segmentation":
        return label_pictures(maps, num_labels)
    if kind == "coord":
        return maps.float() * 2 - 1
    return maps.float()


def save_condition_grid(conditions: torch.Tensor, samples: torch.Tensor, reals: torch.Tensor | None, kind: str,
                        num_labels: int, path: Path) -> None:
    """One row per condition: the condition, its samples (``len(samples) // len(conditions)`` of them, in order),
    then the real image where one is given (``reals`` [N, C, H, W], or None)."""
    per_row = len(samples) // len(conditions)
    columns = [as_rgb(condition_pictures(conditions, kind, num_labels).cpu())[:, None]]
    columns.append(as_rgb(samples.float().cpu()).view(len(conditions), per_row, 3, *samples.shape[-2:]))
    if reals is not None:
        columns.append(as_rgb(reals.float().cpu())[:, None])
    rows = torch.cat(columns, dim=1)
    save_grid(rows.flatten(0, 1), path, nrow=rows.shape[1])

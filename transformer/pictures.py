"""The picture ``generate.py visualize`` draws of a prior: ``samples_by_class.png``, row ``i`` showing
class ``i`` (``samples.png`` for an unconditional prior)."""

from __future__ import annotations

from pathlib import Path

import torch

from transformer.prior import VQGANPrior
from utils.pictures import MAX_CLASS_ROWS, save_grid

UNCONDITIONAL_ROWS = 4


def prior_samples_picture(prior: VQGANPrior, out_dir: Path, per_row: int, generator: torch.Generator,
                          **sampling: float | int | None) -> Path:
    """A grid of samples of ``prior``: one row per class (the first ``MAX_CLASS_ROWS`` classes) or a few
    unconditional rows."""
    if prior.class_conditional:
        rows = min(prior.num_classes, MAX_CLASS_ROWS)
        labels = torch.arange(rows).repeat_interleave(per_row)
        path = out_dir / "samples_by_class.png"
    else:
        rows, labels, path = UNCONDITIONAL_ROWS, None, out_dir / "samples.png"
    _, images = prior.sample(rows * per_row, labels, generator=generator, **sampling)
    save_grid(images, path, nrow=per_row)
    return path

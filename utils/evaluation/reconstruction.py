"""How good a tokenizer or a prior is: reconstruction metrics over a dataset, and FID of generated images.

Reconstructions are :meth:`vqgan.model.VQGAN.reconstruct`'s: ``decode_indices(encode_to_indices(images))``
clamped to [-1, 1], exactly what decoding the tokens a user exports gives back. Every metric is
accumulated over all images seen, so the reported values describe the whole evaluated set, whatever
the batch size.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from utils.evaluation.metrics import (
    SSIM_WINDOW,
    CodebookStats,
    FeatureNetwork,
    FeatureStats,
    fid_from_features,
    fid_from_stats,
    psnr,
    ssim,
)
from vqgan import VQGAN


@torch.no_grad()
def reconstruct_batches(vqgan: VQGAN, batches: Iterable, device: torch.device
                        ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per batch of (images, labels): (images, labels, indices [B, h, w], reconstructions), all on the CPU."""
    for images, labels in batches:
        indices, reconstructions = vqgan.reconstruct(images.to(device))
        yield images, labels, indices.cpu(), reconstructions.float().cpu()


@torch.no_grad()
def decode_batches(vqgan: VQGAN, indices: torch.Tensor, batch_size: int,
                   device: torch.device) -> Iterator[torch.Tensor]:
    """Images (CPU, clamped to [-1, 1]) for code indices [N, h, w], ``batch_size`` at a time."""
    for chunk in indices.split(batch_size):
        yield vqgan.decode_indices(chunk.to(device)).clamp(-1, 1).float().cpu()


class FeatureSet:
    """Features of one image set for FID: running float64 statistics, plus the features themselves while
    there are fewer of them than dimensions.

    For such small sets :func:`utils.evaluation.metrics.fid_from_features` gives the same value as the
    statistics, without a D x D eigendecomposition (seconds for Inception's 2048 dimensions on a CPU).
    """

    def __init__(self) -> None:
        self.stats: FeatureStats | None = None
        self.rows: list[torch.Tensor] | None = []

    @property
    def count(self) -> int:
        return 0 if self.stats is None else self.stats.count

    def update(self, features: torch.Tensor) -> None:
        """Add features [N, D]."""
        if self.stats is None:
            self.stats = FeatureStats(features.shape[-1])
        self.stats.update(features)
        if self.rows is not None and self.count < self.stats.dim:
            self.rows.append(features.detach().double().cpu())
        else:
            self.rows = None

    def fid(self, other: FeatureSet) -> float:
        """FID between this set and ``other`` (each needs at least 2 feature vectors)."""
        if self.stats is None or other.stats is None:
            raise ValueError("FID needs features of both image sets")
        if self.rows is not None and other.rows is not None:
            return fid_from_features(torch.cat(self.rows), torch.cat(other.rows))
        return fid_from_stats(self.stats, other.stats)


class ReconstructionMetrics:
    """PSNR, SSIM, codebook usage and perplexity, and optionally rFID and LPIPS over a whole dataset.

    PSNR, SSIM and LPIPS are means over images of the per-image values; usage and perplexity come
    from the code histogram of all images (:class:`utils.evaluation.metrics.CodebookStats`); rFID is the
    Frechet distance between Inception features of the originals and of the reconstructions.
    SSIM is left out (``None``) for images smaller than its 11x11 window.
    """

    def __init__(self, codebook_size: int, inception: FeatureNetwork | None = None,
                 lpips: nn.Module | None = None) -> None:
        self.codes = CodebookStats(codebook_size)
        self.inception = inception
        self.lpips = lpips
        self.count = 0
        self.sums = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
        self.has_ssim = True
        self.features = (FeatureSet(), FeatureSet())

    @torch.no_grad()
    def update(self, images: torch.Tensor, reconstructions: torch.Tensor, indices: torch.Tensor) -> None:
        """Add a batch: originals and reconstructions [B, C, H, W] in [-1, 1], their codes [B, h, w]."""
        self.count += images.shape[0]
        self.codes.update(indices)
        self.sums["psnr"] += float(psnr(reconstructions, images, reduction="none").double().sum())
        self.has_ssim = self.has_ssim and min(images.shape[-2:]) >= SSIM_WINDOW
        if self.has_ssim:
            self.sums["ssim"] += float(ssim(reconstructions, images, reduction="none").double().sum())
        if self.lpips is not None:
            device = next(self.lpips.parameters()).device
            distance = self.lpips(reconstructions.to(device), images.to(device))
            self.sums["lpips"] += float(distance.double().sum())
        if self.inception is not None:
            self.features[0].update(self.inception(images))
            self.features[1].update(self.inception(reconstructions))

    def result(self) -> dict[str, float | int | None]:
        """``n_images``, ``psnr``, ``ssim``, ``codebook_usage``, ``perplexity`` (+ ``rfid``, ``lpips``)."""
        if self.count == 0:
            raise ValueError("no images were evaluated")
        metrics: dict[str, float | int | None] = {
            "n_images": self.count,
            "psnr": self.sums["psnr"] / self.count,
            "ssim": self.sums["ssim"] / self.count if self.has_ssim else None,
            "codebook_usage": self.codes.usage,
            "perplexity": self.codes.perplexity,
            "codebook_size": self.codes.codebook_size,
        }
        if self.inception is not None:
            metrics["rfid"] = self.features[0].fid(self.features[1])
        if self.lpips is not None:
            metrics["lpips"] = self.sums["lpips"] / self.count
        return metrics


def generation_fid(samples: FeatureSet, reference_batches: Iterable, network: FeatureNetwork,
                   total: int | None = None) -> tuple[float, int]:
    """(FID, number of reference images) of generated-image features ``samples`` against real images.

    ``reference_batches`` yields (images, labels) batches in [-1, 1]; ``total`` sizes the progress bar.
    """
    reference = FeatureSet()
    for images, _ in tqdm(reference_batches, desc="reference features", total=total, dynamic_ncols=True):
        reference.update(network(images))
    return samples.fid(reference), reference.count

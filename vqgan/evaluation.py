"""How good a tokenizer is: reconstruction metrics and codebook statistics over a whole dataset.

Reconstructions are :meth:`vqgan.model.VQGAN.reconstruct`'s: ``decode_indices(encode_to_indices(images))``
clamped to [-1, 1], exactly what decoding the tokens a user exports gives back. Every metric is
accumulated over all images seen, so the reported values describe the whole evaluated set, whatever
the batch size.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn

from utils.evaluation.metrics import SSIM_WINDOW, FeatureNetwork, FeatureSet, psnr, ssim
from vqgan.model import VQGAN
from vqgan.quantizer import usage_and_perplexity


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


class CodebookStats:
    """Counts how often each code index occurs over a whole dataset.

    ``usage`` is the fraction of codes seen at least once; ``perplexity`` is ``exp`` of the entropy
    of the empirical code distribution (1 when one code is used, ``codebook_size`` when all are used
    equally); ``counts`` holds the histogram.
    """

    def __init__(self, codebook_size: int) -> None:
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be positive, got {codebook_size}")
        self.codebook_size = codebook_size
        self.counts = torch.zeros(codebook_size, dtype=torch.long)

    def update(self, indices: torch.Tensor) -> None:
        """Add a tensor of code indices of any shape."""
        flat = indices.detach().reshape(-1).long().cpu()
        if flat.numel() == 0:
            return
        if int(flat.min()) < 0 or int(flat.max()) >= self.codebook_size:
            raise ValueError(
                f"code indices must lie in [0, {self.codebook_size}), got [{int(flat.min())}, {int(flat.max())}]"
            )
        self.counts += torch.bincount(flat, minlength=self.codebook_size)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def usage(self) -> float:
        return usage_and_perplexity(self.counts)[0]

    @property
    def perplexity(self) -> float:
        if self.total == 0:
            raise ValueError("perplexity is undefined before any indices were added")
        return usage_and_perplexity(self.counts)[1]


class ReconstructionMetrics:
    """PSNR, SSIM, codebook usage and perplexity, and optionally rFID and LPIPS over a whole dataset.

    PSNR, SSIM and LPIPS are means over images of the per-image values; usage and perplexity come
    from the code histogram of all images (:class:`CodebookStats`); rFID is the
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

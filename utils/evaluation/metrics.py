"""Evaluation metrics: PSNR, SSIM, Frechet distance and FID (of reconstructions or of generated images).

Images are float tensors [N, C, H, W] in ``value_range`` ((-1, 1) by default, the range the models
work in). PSNR and SSIM map them to [0, 1] (clamping values outside the range, as saving an image
would), compute in float64 with data range 1 and return float32 tensors. FID takes features from
any network that maps such a batch to [N, D] features; :func:`utils.evaluation.inception.load_inception`
gives the standard one.
"""

from __future__ import annotations

from typing import Callable, Iterable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

Reduction = Literal["mean", "none"]
FeatureNetwork = Callable[[torch.Tensor], torch.Tensor]


SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _to_unit_range(images: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    low, high = value_range
    return ((images.double() - low) / (high - low)).clamp(0, 1)


def _reduce(per_image: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    if reduction == "mean":
        return per_image.mean().float()
    if reduction == "none":
        return per_image.float()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def psnr(
    pred: torch.Tensor,
    target: torch.Tensor,
    value_range: tuple[float, float] = (-1.0, 1.0),
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, ``-10 log10(MSE)`` per image on [0, 1] pixels (data range 1).

    ``reduction="mean"`` gives the mean over images of the per-image PSNR (what we report; it is
    not the PSNR of the batch's pooled error), ``"none"`` the per-image values [N]. Identical images
    give ``inf`` (no cap).
    """
    squared_error = (_to_unit_range(pred, value_range) - _to_unit_range(target, value_range)) ** 2
    per_image = -10 * torch.log10(squared_error.flatten(1).mean(dim=1))
    return _reduce(per_image, reduction)


def _gaussian_window(channels: int, like: torch.Tensor) -> torch.Tensor:
    offsets = torch.arange(SSIM_WINDOW, dtype=like.dtype, device=like.device) - SSIM_WINDOW // 2
    gauss = torch.exp(-(offsets**2) / (2 * SSIM_SIGMA**2))
    gauss = gauss / gauss.sum()
    return torch.outer(gauss, gauss).expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW)


def ssim(
    pred: torch.Tensor,
    target: torch.Tensor,
    value_range: tuple[float, float] = (-1.0, 1.0),
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Structural similarity as in Wang et al. (2004), computed per image on [0, 1] pixels.

    Gaussian window 11x11 with sigma 1.5, K1 = 0.01, K2 = 0.03, data range 1. Like the authors'
    reference code the SSIM map covers only positions where the window lies inside the image (no
    padding); it is averaged over those positions and the channels, giving one value per image.
    ``reduction="mean"`` averages those over images. Images must be at least 11x11.
    """
    x, y = _to_unit_range(pred, value_range), _to_unit_range(target, value_range)
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {tuple(x.shape[-2:])}")
    channels = x.shape[1]
    local_means = F.conv2d(torch.cat([x, y, x * x, y * y, x * y]), _gaussian_window(channels, x), groups=channels)
    mu_x, mu_y, mean_xx, mean_yy, mean_xy = local_means.split(x.shape[0])
    var_x, var_y, cov_xy = mean_xx - mu_x**2, mean_yy - mu_y**2, mean_xy - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return _reduce(ssim_map.flatten(1).mean(dim=1), reduction)


def _as_float64(array: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().double().numpy()
    return np.asarray(array, dtype=np.float64)


def frechet_distance(
    mu1: np.ndarray | torch.Tensor,
    sigma1: np.ndarray | torch.Tensor,
    mu2: np.ndarray | torch.Tensor,
    sigma2: np.ndarray | torch.Tensor,
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))``. For the trace term
    ``sigma1`` is factored as ``F F^T`` from its eigendecomposition, dropping directions whose
    eigenvalue is zero up to rounding; ``sigma1 sigma2`` then has the same nonzero eigenvalues as
    the small symmetric matrix ``F^T sigma2 F``, and their square roots are summed. This equals the
    ``scipy.linalg.sqrtm`` form for covariance matrices, stays real without an ``eps`` offset for
    the rank-deficient covariances of few samples, and is several times faster at 2048 dimensions.
    """
    mu1, mu2 = np.atleast_1d(_as_float64(mu1)), np.atleast_1d(_as_float64(mu2))
    sigma1, sigma2 = np.atleast_2d(_as_float64(sigma1)), np.atleast_2d(_as_float64(sigma2))
    dim = mu1.shape[0]
    if mu2.shape != (dim,) or sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f"shape mismatch: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, sigma2 {sigma2.shape}"
        )
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    eigenvalues, eigenvectors = np.linalg.eigh(sigma1)
    keep = eigenvalues > max(eigenvalues.max(), 0.0) * dim * np.finfo(np.float64).eps
    factor = eigenvectors[:, keep] * np.sqrt(eigenvalues[keep])
    inner = factor.T @ sigma2 @ factor
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
    return max(float(distance), 0.0)


class FeatureStats:
    """Running mean and covariance of feature vectors, accumulated in float64.

    Sums are kept relative to the mean of the first batch, which keeps the covariance accurate
    without storing the features. ``covariance`` is the unbiased estimate (as ``np.cov``).
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.count = 0
        self._shift = np.zeros(dim)
        self._sum = np.zeros(dim)
        self._outer = np.zeros((dim, dim))

    def update(self, features: torch.Tensor | np.ndarray) -> None:
        """Add features [N, dim]."""
        features = _as_float64(features)
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"expected features [N, {self.dim}], got shape {features.shape}")
        if features.shape[0] == 0:
            return
        if self.count == 0:
            self._shift = features.mean(axis=0)
        centred = features - self._shift
        self._sum += centred.sum(axis=0)
        self._outer += centred.T @ centred
        self.count += features.shape[0]

    def mean(self) -> np.ndarray:
        if self.count == 0:
            raise ValueError("no features were added")
        return self._shift + self._sum / self.count

    def covariance(self) -> np.ndarray:
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        centred_mean = self._sum / self.count
        return (self._outer - self.count * np.outer(centred_mean, centred_mean)) / (self.count - 1)

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, covariance)."""
        return self.mean(), self.covariance()


def fid_from_stats(stats_a: FeatureStats, stats_b: FeatureStats) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets."""
    return frechet_distance(*stats_a.stats(), *stats_b.stats())


def fid_from_features(features_a: torch.Tensor | np.ndarray, features_b: torch.Tensor | np.ndarray) -> float:
    """FID between two feature matrices [N_a, D] and [N_b, D] (at least 2 rows each).

    With fewer samples than dimensions the covariances have low rank and the same value is computed
    exactly from the centred samples instead of D x D matrices: with ``A``, ``B`` the centred
    features divided by ``sqrt(N - 1)``, ``tr(sigma_a) = |A|_F^2`` and the trace term is the sum of
    the singular values of ``A B^T`` (``sigma_a sigma_b`` and ``(A B^T)(A B^T)^T`` share their
    nonzero eigenvalues).
    """
    features_a, features_b = _as_float64(features_a), _as_float64(features_b)
    if features_a.ndim != 2 or features_b.ndim != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"expected features [N_a, D] and [N_b, D], got {features_a.shape} and {features_b.shape}")
    if min(len(features_a), len(features_b)) < 2:
        raise ValueError("FID needs at least 2 feature vectors per set")
    if max(len(features_a), len(features_b)) >= features_a.shape[1]:
        stats_a = (features_a.mean(axis=0), np.cov(features_a, rowvar=False))
        return frechet_distance(*stats_a, features_b.mean(axis=0), np.cov(features_b, rowvar=False))
    mean_a, mean_b = features_a.mean(axis=0), features_b.mean(axis=0)
    a = (features_a - mean_a) / np.sqrt(len(features_a) - 1)
    b = (features_b - mean_b) / np.sqrt(len(features_b) - 1)
    trace_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    diff = mean_a - mean_b
    return max(float(diff @ diff + np.sum(a * a) + np.sum(b * b) - 2 * trace_sqrt), 0.0)


class FeatureSet:
    """Features of one image set for FID: running float64 statistics, plus the features themselves while
    there are fewer of them than dimensions.

    For such small sets :func:`fid_from_features` gives the same value as the statistics, without a D x D
    eigendecomposition (seconds for Inception's 2048 dimensions on a CPU).
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


def generation_fid(samples: FeatureSet, reference_batches: Iterable, network: FeatureNetwork,
                   total: int | None = None) -> tuple[float, int]:
    """(FID, number of reference images) of generated-image features ``samples`` against real images.

    ``reference_batches`` yields (images, labels) batches in [-1, 1]; ``total`` sizes the progress bar.
    """
    reference = FeatureSet()
    for images, _ in tqdm(reference_batches, desc="reference features", total=total, dynamic_ncols=True):
        reference.update(network(images))
    return samples.fid(reference), reference.count

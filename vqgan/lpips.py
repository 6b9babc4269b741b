"""LPIPS perceptual distance (Zhang et al., 2018) on a frozen VGG16 with learned linear heads.

The backbone is torchvision's VGG16 with ImageNet weights (``VGG16_Weights.IMAGENET1K_V1``); the
linear heads are the v0.1 ``vgg.pth`` shipped inside the PyPI package ``lpips``. Both are read from
files and checked key by key; when a file cannot be found, :class:`LPIPSWeightsError` says which
file, where it was looked for, and how to provide it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import VGG16_Weights, vgg16

VGG_URL = VGG16_Weights.IMAGENET1K_V1.url
HEADS_IN_PACKAGE = Path("weights") / "v0.1" / "vgg.pth"
# End index (exclusive) in ``vgg16().features`` of each tap: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
TAP_ENDS = (4, 9, 16, 23, 30)
TAP_CHANNELS = (64, 128, 256, 512, 512)
# Input shift and scale for images in [-1, 1], matching the statistics the heads were trained with.
INPUT_SHIFT = (-0.030, -0.088, -0.188)
INPUT_SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10


class LPIPSWeightsError(FileNotFoundError):
    """A weight file LPIPS needs is not available."""


class LPIPSWeightsMismatchError(ValueError):
    """A weight file was found but does not hold the expected tensors."""


def vgg_cache_path() -> Path:
    """Where torchvision keeps the downloaded VGG16 ImageNet weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG_URL.rsplit("/", 1)[-1]


def packaged_heads_path() -> Path | None:
    """The ``vgg.pth`` inside the installed ``lpips`` package, or None when it is not installed."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / HEADS_IN_PACKAGE


def _missing(what: str, looked: list[str], fixes: list[str]) -> LPIPSWeightsError:
    lines = [f"LPIPS cannot find the {what}.", "Looked in:"]
    lines += [f"  - {place}" for place in looked]
    lines += ["Fix it in one of these ways:"]
    lines += [f"  {i}. {fix}" for i, fix in enumerate(fixes, 1)]
    return LPIPSWeightsError("\n".join(lines))


def resolve_vgg_weights(path: str | Path | None = None, download: bool = True) -> Path:
    """Find the VGG16 weights: ``path``, else the torchvision cache, else a download (if allowed)."""
    cache = vgg_cache_path()
    what = f"VGG16 ImageNet weights ({cache.name})"
    fixes = [
        f"pass the file: loss.lpips_vgg_path=/path/{cache.name}",
        f"put {cache.name} into the torchvision cache folder: {cache}",
        "turn the perceptual loss off: loss.perceptual_weight=0",
    ]
    if path is not None:
        explicit = Path(path).expanduser()
        if explicit.is_file():
            return explicit
        raise _missing(what, [str(explicit)], fixes)
    if cache.is_file():
        return cache
    looked = [str(cache)]
    if not download:
        raise _missing(what, looked + [f"{VGG_URL} (download disabled)"], fixes)
    cache.parent.mkdir(parents=True, exist_ok=True)
    hash_prefix = cache.stem.rsplit("-", 1)[-1]
    try:
        torch.hub.download_url_to_file(VGG_URL, str(cache), hash_prefix=hash_prefix, progress=False)
    except (OSError, RuntimeError) as err:
        raise _missing(what, looked + [f"{VGG_URL} (download failed: {err})"], fixes) from err
    return cache


def resolve_heads_weights(path: str | Path | None = None) -> Path:
    """Find the LPIPS linear heads: ``path``, else the ``vgg.pth`` of the installed ``lpips`` package."""
    what = "LPIPS linear-head weights (vgg.pth, v0.1)"
    fixes = [
        "pass the file: loss.lpips_heads_path=/path/vgg.pth",
        f"install the lpips package, which ships it as lpips/{HEADS_IN_PACKAGE.as_posix()}: pip install lpips",
        "turn the perceptual loss off: loss.perceptual_weight=0",
    ]
    if path is not None:
        explicit = Path(path).expanduser()
        if explicit.is_file():
            return explicit
        raise _missing(what, [str(explicit)], fixes)
    packaged = packaged_heads_path()
    if packaged is not None and packaged.is_file():
        return packaged
    place = str(packaged) if packaged is not None else f"lpips/{HEADS_IN_PACKAGE.as_posix()} (package not installed)"
    raise _missing(what, [place], fixes)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise LPIPSWeightsMismatchError(f"'{path}' is not a readable PyTorch weights file: {err}") from err
    if not isinstance(state, dict):
        raise LPIPSWeightsMismatchError(f"'{path}' holds a {type(state).__name__}, expected a state_dict.")
    return state


def _check_keys(path: Path, state: dict[str, torch.Tensor], shapes: dict[str, torch.Size], required: set[str]) -> None:
    """Strict check: every required key present, no unknown keys, every shape as expected."""
    missing = sorted(required - set(state))
    unexpected = sorted(set(state) - set(shapes))
    wrong = [
        f"{key} {tuple(getattr(state[key], 'shape', ()))} instead of {tuple(shape)}"
        for key, shape in shapes.items()
        if key in state and getattr(state[key], "shape", None) != shape
    ]
    if missing or unexpected or wrong:
        parts = [f"'{path}' does not match the expected weights."]
        if missing:
            parts.append(f"Missing keys: {', '.join(missing)}.")
        if unexpected:
            parts.append(f"Unexpected keys: {', '.join(unexpected)}.")
        if wrong:
            parts.append(f"Wrong shapes: {'; '.join(wrong)}.")
        raise LPIPSWeightsMismatchError(" ".join(parts))


def load_vgg_features(path: Path) -> nn.Sequential:
    """``vgg16().features`` with weights from a torchvision VGG16 state_dict (classifier keys optional)."""
    with torch.device("meta"):
        skeleton = vgg16(weights=None)
    shapes = {key: value.shape for key, value in skeleton.state_dict().items()}
    required = {key for key in shapes if key.startswith("features.")}
    state = _read_state_dict(path)
    _check_keys(path, state, shapes, required)
    features = skeleton.features
    features.load_state_dict({key.removeprefix("features."): state[key].float() for key in required}, assign=True)
    return features


def load_heads(path: Path) -> nn.ModuleList:
    """The five 1x1 linear heads from an LPIPS ``vgg.pth`` (keys ``lin{i}.model.1.weight``)."""
    heads = nn.ModuleList(nn.Conv2d(channels, 1, kernel_size=1, bias=False) for channels in TAP_CHANNELS)
    names = {f"lin{i}.model.1.weight": head.weight for i, head in enumerate(heads)}
    state = _read_state_dict(path)
    _check_keys(path, state, {key: weight.shape for key, weight in names.items()}, set(names))
    with torch.no_grad():
        for key, weight in names.items():
            weight.copy_(state[key])
    return heads


class LPIPS(nn.Module):
    """Learned perceptual distance between image batches in [-1, 1]; returns one value per image [B].

    Always frozen and in eval mode (``train()`` keeps it in eval); gradients still flow to the inputs.
    ``vgg_weights``/``heads_weights`` are explicit file paths; by default the backbone comes from the
    torchvision cache (downloaded there when ``download`` is true) and the heads from the ``lpips``
    package.
    """

    def __init__(
        self, vgg_weights: str | Path | None = None, heads_weights: str | Path | None = None, download: bool = True
    ) -> None:
        super().__init__()
        heads_path = resolve_heads_weights(heads_weights)
        vgg_path = resolve_vgg_weights(vgg_weights, download=download)
        features = load_vgg_features(vgg_path)
        starts = (0,) + TAP_ENDS[:-1]
        self.slices = nn.ModuleList(features[start:end] for start, end in zip(starts, TAP_ENDS))
        self.heads = load_heads(heads_path)
        self.register_buffer("shift", torch.tensor(INPUT_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(INPUT_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        """Stay in eval mode whatever the parent asks."""
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise ValueError(f"LPIPS inputs must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}.")
        if x.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS expects 1 or 3 channels, got {x.shape[1]}.")
        if x.requires_grad == y.requires_grad:
            features = [tap.chunk(2) for tap in self._features(torch.cat([x, y]))]
        else:
            # Only one side needs gradients (a reconstruction against real images): the other side's
            # features are computed without recording, so the backward runs through half the batch.
            fixed, moving = (x, y) if y.requires_grad else (y, x)
            with torch.no_grad():
                fixed_features = self._features(fixed)
            features = list(zip(fixed_features, self._features(moving)))
        distance = x.new_zeros(x.shape[0])
        for head, (fx, fy) in zip(self.heads, features):
            distance = distance + head((fx - fy).square()).mean(dim=(1, 2, 3))
        return distance

    def _features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The unit-normalized (over channels) VGG activations at the five taps."""
        h = (images.expand(-1, 3, -1, -1) - self.shift) / self.scale
        features = []
        for layer in self.slices:
            h = layer(h)
            features.append(F.normalize(h, dim=1, eps=NORM_EPS))
        return features

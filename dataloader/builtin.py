"""Procedural shapes: an offline dataset with class labels, deterministic and at any image size.

Item ``i`` of a dataset with seed ``s`` is drawn from its own generator seeded with ``(s, i)``, so
DataLoader workers and re-runs agree. The scene is described in resolution-free units before it is
rendered, so the same item at 28, 32 or 256 pixels shows the same picture. The label is ``i mod
num_classes`` (balanced classes) and decides the kind of shape. Two kinds of scene:

* ``scattered``: 1-3 objects of the class's kind anywhere, at any rotation (upright for the square, diamond
  and frame), in random colours, on a two-colour gradient with a wavy texture;
* ``centred``: one object near the centre, upright within a small tilt, in one of eight hues on a flat
  background of another hue with a brightness ramp. The shape is what varies most, so a small prior learns
  to draw the class it is asked for within minutes.

Background and objects sit on opposite sides of the brightness range, so shapes stay visible in grayscale
too. Edges are antialiased from signed distances.

With ``segmentation`` every image comes with its label map from the same render: 0 on the background
and ``label + 1`` on the pixels that the shapes cover more than half.
"""

import functools
import math
import operator
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from .transforms import LUMA, random_hflip, random_hflip_pair

SHAPES = ("circle", "square", "triangle", "ring", "cross", "stripes", "checker",
          "diamond", "star", "crescent", "hexagon", "frame")

Sdf = Callable[[np.ndarray, np.ndarray, float], np.ndarray]


def _box(u: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
    return np.maximum(np.abs(u) - a, np.abs(v) - b)


def _polygon(u: np.ndarray, v: np.ndarray, r: float, sides: int) -> np.ndarray:
    apothem = r * math.cos(math.pi / sides)
    normals = 2 * math.pi * (np.arange(sides) + 0.5) / sides
    return np.max(u[..., None] * np.cos(normals) + v[..., None] * np.sin(normals), axis=-1) - apothem


def _star(u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    sector = 2 * math.pi / 5
    turn = np.mod(np.arctan2(v, u), sector)
    from_tip = np.minimum(turn, sector - turn)
    tip, notch, half = 1.1 * r, 0.45 * r, sector / 2
    outline = tip * notch * math.sin(half) / (tip * np.sin(from_tip) + notch * np.sin(half - from_tip))
    return 0.5 * (np.hypot(u, v) - outline)


def _diamond(u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    a, b = 0.6 * r, r
    return (np.abs(u) / a + np.abs(v) / b - 1.0) * (a * b / math.hypot(a, b))


def _crescent(u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    return np.maximum(np.hypot(u, v) - r, 0.8 * r - np.hypot(u - 0.45 * r, v))


# Signed distance (negative inside) of each shape, in image-width units, at local coordinates (u, v).
_SDF: dict[str, Sdf] = {
    "circle": lambda u, v, r: np.hypot(u, v) - r,
    "square": lambda u, v, r: _box(u, v, 0.8 * r, 0.8 * r),
    "triangle": lambda u, v, r: _polygon(u, v, 1.1 * r, 3),
    "ring": lambda u, v, r: np.abs(np.hypot(u, v) - 0.78 * r) - 0.22 * r,
    "cross": lambda u, v, r: np.minimum(_box(u, v, r, 0.3 * r), _box(u, v, 0.3 * r, r)),
    "stripes": lambda u, v, r: _box(u, v, 0.85 * r, 0.85 * r),
    "checker": lambda u, v, r: _box(u, v, 0.85 * r, 0.85 * r),
    "diamond": _diamond,
    "star": _star,
    "crescent": _crescent,
    "hexagon": lambda u, v, r: _polygon(u, v, r, 6),
    "frame": lambda u, v, r: np.maximum(_box(u, v, 0.85 * r, 0.85 * r), -_box(u, v, 0.5 * r, 0.5 * r)),
}
_UPRIGHT = {"square", "diamond", "frame"}
RENDER_VERSION = 3  # raised whenever the pictures change: caches of results computed from them are keyed by it
SCENES = ("scattered", "centred")

# Centred scenes: the hues of the background and the object, and their brightness (luma) on either side.
PALETTE = np.array([(0.90, 0.15, 0.15), (0.95, 0.55, 0.10), (0.95, 0.90, 0.15), (0.20, 0.75, 0.25),
                    (0.10, 0.70, 0.70), (0.20, 0.35, 0.90), (0.60, 0.25, 0.85), (0.95, 0.45, 0.70)])
DARK_LUMA, LIGHT_LUMA = 0.2, 0.8
BACKGROUND_RAMP = 0.2  # brightness change across the image along the background's gradient
CENTRE_JITTER = 0.08  # the object's centre is within this (image widths) of the image's centre
CENTRED_RADIUS = (0.28, 0.38)  # image widths
TILT = 0.3  # radians either way: the upright shapes in scattered scenes, every shape in centred ones
# Period of the stripes and checkers, in object radii. A centred checker has cells of about 5 pixels at 32x32, so that
# an 8x8 token grid can still tell it from a plain square.
PATTERN_PERIOD = {"scattered": {"stripes": 0.57, "checker": 0.57}, "centred": {"stripes": 0.57, "checker": 1.0}}


def _with_luma(rgb: np.ndarray, target: float) -> np.ndarray:
    """Shift a colour so that its luma becomes ``target`` (clipped to valid colours)."""
    return np.clip(rgb + (target - float(rgb @ LUMA)), 0.0, 1.0)


def _random_colour(rng: np.random.Generator, luma: float) -> np.ndarray:
    return _with_luma(rng.random(3), luma)


def _palette_colour(rng: np.random.Generator, luma: float) -> np.ndarray:
    return _with_luma(PALETTE[rng.integers(len(PALETTE))], luma)


def _pattern(phase: np.ndarray, pixels_per_period: float) -> np.ndarray:
    """Antialiased square wave in [0, 1] from a sinusoid's phase (radians)."""
    wave = np.sin(phase)
    return np.clip(0.5 + wave * pixels_per_period / (2 * math.pi), 0.0, 1.0)


class ShapesDataset(Dataset):
    """``length`` procedurally drawn images of coloured shapes; item ``i`` has class ``i % num_classes``.

    Items are ``(image, label)``, or ``(image, mask, label)`` with ``segmentation``: mask is a long [1,H,W] label
    map, flipped with the image.
    """

    def __init__(self, length: int, image_size: int = 32, channels: int = 3, num_classes: int = 10,
                 seed: int = 0, augment: bool = False, segmentation: bool = False, scene: str = "scattered") -> None:
        if not 1 <= num_classes <= len(SHAPES):
            raise ValueError(f"data.num_classes for the builtin dataset must be between 1 and {len(SHAPES)} "
                             f"(one per shape kind: {', '.join(SHAPES)}), got {num_classes}.")
        if channels not in (1, 3):
            raise ValueError(f"data.channels must be 1 or 3, got {channels}.")
        if scene not in SCENES:
            raise ValueError(f"data.scene must be one of {', '.join(SCENES)}, got {scene!r}.")
        if length < 1 or image_size < 1:
            raise ValueError(f"builtin dataset needs length >= 1 and image_size >= 1, got {length} and {image_size}.")
        self.length = length
        self.image_size = image_size
        self.channels = channels
        self.num_classes = num_classes
        self.class_names = list(SHAPES[:num_classes])
        self.seed = seed
        self.augment = augment
        self.segmentation = segmentation
        self.scene = scene
        centres = (np.arange(image_size) + 0.5) / image_size
        self._y, self._x = np.meshgrid(centres, centres, indexing="ij")

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return (f"ShapesDataset({self.length} images, {self.image_size}x{self.image_size}x{self.channels}, "
                f"{self.num_classes} classes, {self.scene} scenes, seed {self.seed})")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | tuple[torch.Tensor, torch.Tensor, int]:
        index = operator.index(index)
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} images")
        label = index % self.num_classes
        pixels, covered = self.render(np.random.default_rng([self.seed, index]), SHAPES[label])
        if self.channels == 1:
            pixels = pixels @ np.asarray(LUMA)
            pixels = pixels[:, :, None]
        image = torch.from_numpy(pixels.astype(np.float32)).permute(2, 0, 1).mul(2.0).sub(1.0).contiguous()
        if not self.segmentation:
            if self.augment:
                image = random_hflip(image)
            return image, label
        mask = torch.from_numpy(covered.astype(np.int64) * (label + 1))[None]
        if self.augment:
            image, mask = random_hflip_pair(image, mask)
        return image, mask, label

    def render(self, rng: np.random.Generator, shape: str) -> tuple[np.ndarray, np.ndarray]:
        """Draw one scene of ``shape`` objects: a float [H,W,3] array in [0, 1] and the bool [H,W] map of the
        pixels the objects cover more than half."""
        dark = rng.random() < 0.5
        return self._centred(rng, shape, dark) if self.scene == "centred" else self._scattered(rng, shape, dark)

    def _scattered(self, rng: np.random.Generator, shape: str, dark: bool) -> tuple[np.ndarray, np.ndarray]:
        x, y = self._x, self._y
        lo, hi = (0.05, 0.35) if dark else (0.65, 0.95)
        start = _with_luma(rng.random(3), rng.uniform(lo, hi))
        end = _with_luma(rng.random(3), rng.uniform(lo, hi))
        angle = rng.uniform(0, 2 * math.pi)
        t = np.clip(0.5 + (x - 0.5) * math.cos(angle) + (y - 0.5) * math.sin(angle), 0.0, 1.0)[..., None]
        image = start * (1 - t) + end * t
        texture = np.zeros_like(x)
        for _ in range(2):
            fx, fy = rng.uniform(-4, 4, size=2)
            texture += np.sin(2 * math.pi * (fx * x + fy * y) + rng.uniform(0, 2 * math.pi))
        image = image + rng.uniform(0.02, 0.06) * texture[..., None]
        background_luma = float((start + end) @ LUMA) / 2

        count = int(rng.choice(3, p=(0.5, 0.3, 0.2))) + 1
        r_lo, r_hi = (0.22, 0.32) if count == 1 else (0.13, 0.21)
        covered = np.zeros(x.shape, dtype=bool)
        for _ in range(count):
            radius = rng.uniform(r_lo, r_hi)
            centre = rng.uniform(radius, 1 - radius, size=2)
            rotation = rng.uniform(-TILT, TILT) if shape in _UPRIGHT else rng.uniform(0, 2 * math.pi)
            luma = rng.uniform(0.65, 1.0) if dark else rng.uniform(0.0, 0.35)
            colour = _with_luma(rng.random(3), luma)
            second = functools.partial(_random_colour, rng, (luma + background_luma) / 2)
            image, coverage = self._draw(image, rng, shape, radius, centre, rotation, colour, second)
            covered |= coverage[..., 0] > 0.5
        return np.clip(image, 0.0, 1.0), covered

    def _centred(self, rng: np.random.Generator, shape: str, dark: bool) -> tuple[np.ndarray, np.ndarray]:
        background_hue, object_hue = rng.choice(len(PALETTE), size=2, replace=False)
        background = _with_luma(PALETTE[background_hue], DARK_LUMA if dark else LIGHT_LUMA)
        colour = _with_luma(PALETTE[object_hue], LIGHT_LUMA if dark else DARK_LUMA)
        angle = rng.uniform(0, 2 * math.pi)
        ramp = (self._x - 0.5) * math.cos(angle) + (self._y - 0.5) * math.sin(angle)
        image = background + BACKGROUND_RAMP * ramp[..., None]
        radius = rng.uniform(*CENTRED_RADIUS)
        centre = 0.5 + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER, size=2)
        rotation = rng.uniform(-TILT, TILT)
        second = functools.partial(_palette_colour, rng, (DARK_LUMA + LIGHT_LUMA) / 2)
        image, coverage = self._draw(image, rng, shape, radius, centre, rotation, colour, second)
        return np.clip(image, 0.0, 1.0), coverage[..., 0] > 0.5

    def _draw(self, image: np.ndarray, rng: np.random.Generator, shape: str, radius: float, centre: np.ndarray,
              rotation: float, colour: np.ndarray, second: Callable[[], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """``image`` with one more object drawn over it, and the object's coverage [H,W,1] in [0, 1]. ``second``
        gives the other colour of stripes and checkers (drawn only for them)."""
        cx, cy = centre
        cos, sin = math.cos(rotation), math.sin(rotation)
        dx, dy = self._x - cx, self._y - cy
        u, v = dx * cos + dy * sin, -dx * sin + dy * cos
        coverage = np.clip(0.5 - _SDF[shape](u, v, radius) * self.image_size, 0.0, 1.0)[..., None]

        shade_angle = rng.uniform(0, 2 * math.pi)
        shade = 1 + 0.2 * (u * math.cos(shade_angle) + v * math.sin(shade_angle)) / radius
        fill = colour * shade[..., None]
        if shape in ("stripes", "checker"):
            other = second()
            period = PATTERN_PERIOD[self.scene][shape] * radius
            pixels_per_period = period * self.image_size
            across = _pattern(2 * math.pi * u / period, pixels_per_period)
            mix = across
            if shape == "checker":
                down = _pattern(2 * math.pi * v / period, pixels_per_period)
                mix = across * down + (1 - across) * (1 - down)
            fill = fill * mix[..., None] + other * (1 - mix[..., None])
        return image * (1 - coverage) + fill * coverage, coverage

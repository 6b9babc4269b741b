"""How well samples of a conditional prior follow their conditions, measured from a folder of samples.

    python -m benchmarks.conditional_quality segmentation --samples OUT --pairs DIR/test [--threshold 10]
                                                          [--json FILE]
    python -m benchmarks.conditional_quality superres --samples OUT --pairs DIR/test --factor 4 [--json FILE]

``OUT`` is what ``generate.py sample --condition DIR/test --out OUT`` wrote: ``OUT/NAME.png``, or
``OUT/NAME_k.png`` for the k-th of several samples per condition. ``DIR/test`` is a paired folder
(``images/NAME.*``, ``conditions/NAME.png``) as ``benchmarks.make_paired_fashion_mnist`` writes; for
``superres`` a plain folder of the images works too. Conditions without samples are left out (and counted).

segmentation (foreground masks, label 0 = background, any other label = foreground): each sample is converted to
8-bit grayscale, resized to its map's size by area averaging (PIL's box filter) and thresholded by the rule the
masks were made with (``> threshold``, default :data:`MASK_THRESHOLD`). Reported over all samples: mean IoU of the
foreground with the sample's own map and pixel accuracy; the same against a wrong map (each condition's samples
against the map of the next name in sorted order), the baseline a prior that ignores its condition would reach;
and the real images passed the same way (resized to the samples' size as the folder loader does, then back), the
ceiling the resizing leaves. Resizing blurs the garment's edge into the dark rim, and a low threshold counts the
blur as foreground: on the Fashion-MNIST test set at 32x32 that ceiling is 0.93 with the box filter against 0.89
with bicubic (wider support, one more pixel of rim), so box it is. Its wrong-map baseline is 0.49.

superres (a prior conditioned on ``lowres_factor``-times smaller copies): the real image ``images/NAME.*`` is read
as the folder loader reads it (resized to the samples' size, bicubic), and its low-res copy made as in training
(``dataloader.transforms.downsample``, the shrink of ``lowres_condition``). Reported: mean PSNR (dB) of the
downsampled sample against that low-res copy (does the sample agree with its input?), and mean PSNR of the sample
against the real image at full size. PSNR is per sample (``utils.evaluation.metrics.psnr``), ``inf`` for an exact
match.

Both modes also report diversity: for conditions with several samples, the mean L1 distance between two samples
of one condition (pixels in [0, 1], averaged over all pairs), next to the mean L1 distance between a sample and its
real image as a reference scale. A prior that copies its input has diversity near 0; one that ignores it has
samples as far apart as from the real image.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.cli import positive_int
from benchmarks.make_paired_fashion_mnist import MASK_THRESHOLD, garment_mask
from dataloader import DataError
from dataloader.folder import image_tensor, list_images, open_image, resize_center_crop, to_8bit
from dataloader.paired import by_stem
from dataloader.transforms import downsample, to_tensor
from utils.evaluation.metrics import psnr

NUMBERED = re.compile(r"^(?P<stem>.+)_(?P<k>\d+)$")


class QualityError(ValueError):
    """The sample or pairs folder cannot be measured as asked."""


def sample_groups(samples: Path, stems: set[str]) -> dict[str, list[Path]]:
    """The samples of each name in ``stems``: ``samples/NAME.png`` or ``samples/NAME_k.png`` (in order of k)."""
    if not samples.is_dir():
        raise QualityError(f"--samples '{samples}' is not a folder. Pass the --out folder of generate.py sample.")
    single: dict[str, Path] = {}
    numbered: dict[str, list[tuple[int, Path]]] = {}
    for path in list_images(samples):
        name = path.relative_to(samples).with_suffix("").as_posix()
        if name in stems:
            single[name] = path
        elif (match := NUMBERED.match(name)) and match["stem"] in stems:
            numbered.setdefault(match["stem"], []).append((int(match["k"]), path))
    if both := sorted(set(single) & set(numbered)):
        raise QualityError(f"'{samples}' holds both {both[0]}.png and {both[0]}_k.png (and so for {len(both)} "
                           f"name(s)): samples of two runs. Sample into an empty folder.")
    groups = {stem: [path] for stem, path in single.items()}
    groups.update({stem: [path for _, path in sorted(found)] for stem, found in numbered.items()})
    if not groups:
        example = min(stems) if stems else "NAME"
        raise QualityError(f"no sample in '{samples}' is named after one of the {len(stems)} conditions (expected "
                           f"e.g. {example}.png or {example}_0.png). Sample with --condition on the same folder.")
    return {stem: groups[stem] for stem in sorted(groups)}


def unit(pixels: np.ndarray | torch.Tensor) -> np.ndarray:
    """8-bit pixels, or a tensor in [-1, 1], as float64 in [0, 1]."""
    if isinstance(pixels, torch.Tensor):
        return ((pixels.double() + 1) / 2).clamp(0, 1).numpy()
    return np.asarray(pixels, dtype=np.float64) / 255


def mean_pairwise_l1(samples: list[np.ndarray]) -> float:
    """Mean over all pairs of the mean absolute difference of two [0, 1] arrays."""
    return float(np.mean([np.abs(a - b).mean() for a, b in itertools.combinations(samples, 2)]))


def iou(predicted: np.ndarray, target: np.ndarray) -> float:
    """Intersection over union of two boolean masks; 1 when both are empty."""
    union = np.logical_or(predicted, target).sum()
    return float(np.logical_and(predicted, target).sum() / union) if union else 1.0


def mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def square_side(image: Image.Image, path: Path) -> int:
    if image.width != image.height:
        raise QualityError(f"'{path}' is {image.width}x{image.height}; samples and maps must be square here.")
    return image.width


def gray_sample(path: Path) -> np.ndarray:
    """A sample as 8-bit grayscale pixels at its own size."""
    image = open_image(path)
    square_side(image, path)
    return np.asarray(to_8bit(image, 1))


def segmentation_quality(samples: Path, pairs: Path, threshold: int = MASK_THRESHOLD) -> dict:
    """The segmentation figures of the module docstring."""
    maps_dir, images_dir = pairs / "conditions", pairs / "images"
    if not maps_dir.is_dir():
        raise QualityError(f"'{pairs}' has no conditions/ folder; pass the paired folder the samples were drawn "
                           f"from (DIR/test with images/ and conditions/).")
    maps = by_stem(list_images(maps_dir), maps_dir)
    reals = by_stem(list_images(images_dir), images_dir) if images_dir.is_dir() else {}
    groups = sample_groups(samples, set(maps))
    stems = list(groups)
    foreground = {}
    for stem in stems:
        labels = open_image(maps[stem])
        square_side(labels, maps[stem])
        if labels.mode not in ("L", "P"):
            raise QualityError(f"map '{maps[stem]}' is a {labels.mode} image; a label map is 8-bit single-channel.")
        foreground[stem] = np.asarray(labels) != 0
    ious, accuracies, wrong_ious, wrong_accuracies, real_ious = [], [], [], [], []
    diversities, real_l1 = [], []
    for position, stem in enumerate(stems):
        target = foreground[stem]
        wrong = foreground[stems[(position + 1) % len(stems)]] if len(stems) > 1 else None
        pixels = [gray_sample(path) for path in groups[stem]]
        for sample in pixels:
            predicted = garment_mask(back_to(sample, target.shape[0]), threshold).astype(bool)
            ious.append(iou(predicted, target))
            accuracies.append(float((predicted == target).mean()))
            if wrong is not None:
                wrong_ious.append(iou(predicted, wrong))
                wrong_accuracies.append(float((predicted == wrong).mean()))
        if len(pixels) > 1:
            diversities.append(mean_pairwise_l1([unit(p) for p in pixels]))
        if stem in reals:
            real = np.asarray(resize_center_crop(to_8bit(open_image(reals[stem]), 1), pixels[0].shape[0]))
            real_ious.append(iou(garment_mask(back_to(real, target.shape[0]), threshold).astype(bool), target))
            real_l1.extend(float(np.abs(unit(p) - unit(real)).mean()) for p in pixels)
    return {"mode": "segmentation", "samples": str(samples), "pairs": str(pairs), "threshold": threshold,
            "n_conditions": len(maps), "n_conditions_sampled": len(stems), "n_samples": len(ious),
            "iou": mean(ious), "pixel_accuracy": mean(accuracies),
            "iou_wrong_map": mean(wrong_ious), "pixel_accuracy_wrong_map": mean(wrong_accuracies),
            "iou_real_images": mean(real_ious), "n_real_images": len(real_ious),
            "diversity_l1": mean(diversities), "n_conditions_with_several": len(diversities),
            "sample_to_real_l1": mean(real_l1)}


def back_to(pixels: np.ndarray, side: int) -> np.ndarray:
    """8-bit grayscale pixels resized to ``side`` x ``side`` by area averaging (see the module docstring)."""
    if pixels.shape == (side, side):
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((side, side), Image.Resampling.BOX))


def sample_tensor(path: Path) -> torch.Tensor:
    """A sample as a [C,H,W] tensor in [-1, 1] at its own size (1 channel for a grayscale PNG, else 3)."""
    image = open_image(path)
    square_side(image, path)
    return to_tensor(np.asarray(to_8bit(image, 1 if image.mode == "L" else 3)))


def superres_quality(samples: Path, pairs: Path, factor: int) -> dict:
    """The super-resolution figures of the module docstring."""
    images_dir = pairs / "images" if (pairs / "images").is_dir() else pairs
    if not images_dir.is_dir():
        raise QualityError(f"--pairs '{pairs}' is not a folder; pass the folder of the real images (or its parent "
                           f"holding images/).")
    reals = by_stem(list_images(images_dir), images_dir)
    groups = sample_groups(samples, set(reals))
    lowres_psnr, full_psnr, diversities, real_l1 = [], [], [], []
    for stem, paths in groups.items():
        drawn = [sample_tensor(path) for path in paths]
        if len({d.shape for d in drawn}) > 1:
            raise QualityError(f"the samples of {stem} differ in size or channels: {[tuple(d.shape) for d in drawn]}.")
        drawn = torch.stack(drawn)
        channels, side = drawn.shape[1], drawn.shape[-1]
        if side % factor:
            raise QualityError(f"samples of {stem} are {side}x{side}, not divisible by --factor {factor}; pass the "
                               f"prior's data.lowres_factor.")
        real = image_tensor(open_image(reals[stem]), side, channels)[None].expand_as(drawn)
        lowres_psnr.extend(psnr(downsample(drawn, factor), downsample(real, factor), reduction="none").tolist())
        full_psnr.extend(psnr(drawn, real, reduction="none").tolist())
        if len(drawn) > 1:
            diversities.append(mean_pairwise_l1([unit(d) for d in drawn]))
        real_l1.extend(float(np.abs(unit(d) - unit(real[0])).mean()) for d in drawn)
    return {"mode": "superres", "samples": str(samples), "pairs": str(images_dir), "factor": factor,
            "n_conditions": len(reals), "n_conditions_sampled": len(groups), "n_samples": len(full_psnr),
            "psnr_lowres": mean(lowres_psnr), "psnr_full": mean(full_psnr),
            "diversity_l1": mean(diversities), "n_conditions_with_several": len(diversities),
            "sample_to_real_l1": mean(real_l1)}


def table(figures: dict) -> str:
    """The figures as aligned ``name  value`` lines."""
    width = max(len(key) for key in figures)
    lines = []
    for key, value in figures.items():
        shown = "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"{key:<{width}}  {shown}")
    return "\n".join(lines)


def threshold_value(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 254:
        raise argparse.ArgumentTypeError(f"an 8-bit threshold is 0..254, got {value}")
    return value


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    for mode, help_text in (("segmentation", "samples of a segmentation-conditioned prior"),
                            ("superres", "samples of a low-res-conditioned prior")):
        sub = modes.add_parser(mode, help=help_text)
        sub.add_argument("--samples", type=Path, required=True, help="the --out folder of generate.py sample")
        sub.add_argument("--pairs", type=Path, required=True, help="the paired folder the conditions came from")
        sub.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
        if mode == "segmentation":
            sub.add_argument("--threshold", type=threshold_value, default=MASK_THRESHOLD,
                             help=f"foreground = 8-bit pixel above this (default {MASK_THRESHOLD}, as the masks)")
        else:
            sub.add_argument("--factor", type=positive_int, required=True, help="the prior's data.lowres_factor")
    args = parser.parse_args(argv)
    try:
        if args.mode == "segmentation":
            figures = segmentation_quality(args.samples, args.pairs, args.threshold)
        else:
            figures = superres_quality(args.samples, args.pairs, args.factor)
    except (QualityError, DataError) as err:
        sys.exit(f"error: {err}")
    print(table(figures))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")  # an exact match's PSNR is written as Infinity
        print(f"wrote {args.json}")
    return figures


if __name__ == "__main__":
    main()

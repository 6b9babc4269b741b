"""A paired folder from Fashion-MNIST: each garment with its foreground mask, for segmentation-conditioned priors.

    python -m benchmarks.make_paired_fashion_mnist --out DIR [--root /usr/share/datasets/fashion-mnist]
                                                   [--limit-train N] [--limit-test N] [--mosaic K]

Writes ``DIR/train/images/NNNNNN.png`` and ``DIR/train/conditions/NNNNNN.png`` (60000 pairs), and the same under
``DIR/test/`` (10000), numbered in the order of the idx files with six digits, as ``generate.py`` names the outputs
of a test split, so samples drawn with ``--condition test`` and those drawn from this folder share their names.
An image is the 28x28 8-bit grayscale picture exactly as stored; its map is an 8-bit label PNG
(``data.num_labels: 2``): 1 where the pixel is above :data:`MASK_THRESHOLD`, else 0. With ``--mosaic K`` every
pair is a K x K mosaic of consecutive garments (28K x 28K pixels; the last garments that do not fill a mosaic are
left out): larger scenes whose windows a prior trains on (``data.crop_size``) and samples beyond their size.

Why 10: half the pixels of Fashion-MNIST are exactly 0 and the rest are the garment, but a rim of values 1..8
(the scan's fringe, a few percent of pixels) surrounds it. Counted on 2000 test images, ``> 0`` gives 7.5
connected foreground pieces per image (89% of images in more than one piece); the count falls to 1.15 at ``> 10``
(8% of images in more than one piece, mostly sandals and bags whose straps are thin) and rises again above 16,
where dark garments start to lose pixels (``> 64`` gives 2.2 pieces and more holes). So 10 (4% of full scale)
drops the fringe and keeps dark cloth; the foreground is 47% of the pixels. Cloth printed black (letters, dark
checks) is as dark as the background and leaves holes at any threshold.

``DIR/paired_fashion_mnist.json`` records what was written; the script writes only into an empty or missing folder
or into one holding that record (then it rewrites the pairs and removes numbered pairs a larger earlier run left).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.cli import positive_int
from dataloader.idx import read_idx
from dataloader.standard import IDX_FILES

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
MASK_THRESHOLD = 10  # 8-bit pixel value; the garment is what lies above it (see the module docstring)
RECORD = "paired_fashion_mnist.json"
SPLITS = ("train", "test")
NAME = re.compile(r"^\d{6}\.png$")


class FolderInUse(RuntimeError):
    """The output folder holds files this script did not write."""


def garment_mask(pixels: np.ndarray, threshold: int = MASK_THRESHOLD) -> np.ndarray:
    """uint8 labels of the same shape: 1 where ``pixels`` (8-bit) is above ``threshold``, else 0."""
    return (np.asarray(pixels) > threshold).astype(np.uint8)


def idx_images(root: Path, split: str) -> np.ndarray:
    """The uint8 [N,28,28] images of ``split`` from the idx file (gzip-compressed or not) under ``root``."""
    name = IDX_FILES[split][0]
    for path in (root / f"{name}.gz", root / name):
        if path.is_file():
            images = read_idx(path, ndim=3)
            if images.dtype != np.uint8:
                raise ValueError(f"'{path}' holds {images.dtype} values, expected 8-bit (uint8) images.")
            return images
    raise FileNotFoundError(f"no {name}.gz (or {name}) in '{root}'. Pass --root with the Fashion-MNIST idx files; "
                            f"on Debian `apt install dataset-fashion-mnist` puts them in {DEFAULT_ROOT}.")


def claim(out: Path) -> None:
    """Make ``out`` or accept it when it is empty or one this script wrote; FolderInUse otherwise."""
    if out.exists() and not out.is_dir():
        raise FolderInUse(f"--out '{out}' is a file, not a folder.")
    if out.is_dir() and any(out.iterdir()) and not (out / RECORD).is_file():
        raise FolderInUse(f"--out '{out}' is not empty and has no {RECORD}, so this script did not write it; "
                          f"refusing to mix pairs into it. Pass a new or empty folder.")
    out.mkdir(parents=True, exist_ok=True)


def mosaics(images: np.ndarray, side: int) -> np.ndarray:
    """[N, H, W] images -> [N // side**2, side * H, side * W]: each ``side`` x ``side`` consecutive images in raster
    order."""
    count, height, width = images.shape
    tiles = images[:count // side**2 * side**2].reshape(-1, side, side, height, width)
    return tiles.transpose(0, 1, 3, 2, 4).reshape(-1, side * height, side * width)


def write_split(images: np.ndarray, folder: Path, threshold: int) -> int:
    """Write ``folder/images/NNNNNN.png`` and ``folder/conditions/NNNNNN.png``; return the foreground pixel count."""
    image_dir, mask_dir = folder / "images", folder / "conditions"
    image_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    foreground = 0
    for index, pixels in enumerate(images):
        mask = garment_mask(pixels, threshold)
        foreground += int(mask.sum())
        Image.fromarray(pixels).save(image_dir / f"{index:06d}.png")
        Image.fromarray(mask).save(mask_dir / f"{index:06d}.png")
    for directory in (image_dir, mask_dir):  # numbered pairs beyond this run's count, from an earlier larger run
        for path in directory.iterdir():
            if NAME.match(path.name) and int(path.stem) >= len(images):
                path.unlink()
    return foreground


def make_pairs(out: Path, root: Path = DEFAULT_ROOT, limits: dict[str, int | None] | None = None,
               threshold: int = MASK_THRESHOLD, mosaic: int = 1) -> dict:
    """Write the paired folder (see the module docstring); return the record written to ``out/RECORD``. ``limits``
    count garments."""
    limits = limits or {}
    arrays = {split: mosaics(idx_images(root, split)[:limits.get(split)], mosaic) for split in SPLITS}
    empty = [split for split, images in arrays.items() if not len(images)]
    if empty:
        raise ValueError(f"the {' and '.join(empty)} split would hold no {mosaic}x{mosaic} mosaic; allow at least "
                         f"{mosaic * mosaic} garments per split.")
    claim(out)
    record: dict = {"source": str(root), "threshold": threshold, "labels": 2, "mosaic": mosaic, "complete": False}
    (out / RECORD).write_text(json.dumps(record, indent=2) + "\n")  # claimed before the first pair is written
    for split, images in arrays.items():
        foreground = write_split(images, out / split, threshold)
        record[split] = {"pairs": len(images), "foreground_fraction": foreground / max(1, images.size)}
    record["complete"] = True
    (out / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the paired folder to write")
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="folder of the four idx files")
    parser.add_argument("--limit-train", type=positive_int, default=None, help="write only the first N train pairs")
    parser.add_argument("--limit-test", type=positive_int, default=None, help="write only the first N test pairs")
    parser.add_argument("--mosaic", type=positive_int, default=1,
                        help="each pair a K x K mosaic of consecutive garments (default 1: single garments); the "
                             "limits count garments")
    args = parser.parse_args(argv)
    try:
        record = make_pairs(args.out, args.root, {"train": args.limit_train, "test": args.limit_test},
                            mosaic=args.mosaic)
    except (FolderInUse, FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    for split in SPLITS:
        print(f"wrote {record[split]['pairs']} {split} pairs to {args.out / split} (images/, conditions/) "
              f"(foreground {record[split]['foreground_fraction']:.1%} of pixels)")
    side = 28 * args.mosaic
    print(f"images: {side}x{side} 8-bit grayscale from {args.root}; conditions: label 1 where pixel > "
          f"{MASK_THRESHOLD}, else 0 (data.num_labels: 2); record in {args.out / RECORD}")
    return record


if __name__ == "__main__":
    main()

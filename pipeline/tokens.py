"""Tokenise a dataset once with a frozen VQGAN and cache the code indices on disk."""

from __future__ import annotations

import hashlib
import json
import pickle
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataloader import build_dataset, num_classes_of
from utils.checkpoint import save_checkpoint
from utils.config import DataConfig, to_dict
from vqgan import VQGAN

TOKENIZE_BATCH = 256


def cache_key(checkpoint: str | Path, data: DataConfig, split: str) -> str:
    """Hash of the stage-1 checkpoint's bytes and the data settings that change the images."""
    digest = hashlib.sha256()
    with open(checkpoint, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    settings = {k: v for k, v in to_dict(data).items() if k not in ("num_workers", "random_flip")}
    digest.update(json.dumps({"data": settings, "split": split}, sort_keys=True).encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def tokenize_dataset(vqgan: VQGAN, data: DataConfig, checkpoint: str | Path, cache_dir: str | Path,
                     device: torch.device, split: str = "train") -> dict:
    """{"indices": int32 [N, h*w], "labels": long [N], "num_classes": int}, from the cache when present."""
    path = Path(cache_dir) / f"{data.name}_{split}_{cache_key(checkpoint, data, split)}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=True)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
            warnings.warn(f"token cache {path} is unreadable ({str(err).splitlines()[0]}); tokenising again.",
                          stacklevel=2)
    dataset = build_dataset(data, split, augment=False)
    loader = DataLoader(dataset, batch_size=TOKENIZE_BATCH, shuffle=False, num_workers=data.num_workers)
    all_indices, all_labels = [], []
    for images, labels in tqdm(loader, desc="tokenising", dynamic_ncols=True):
        all_indices.append(vqgan.encode_to_indices(images.to(device)).flatten(1).to(torch.int32).cpu())
        all_labels.append(labels.long())
    tokens = {"indices": torch.cat(all_indices), "labels": torch.cat(all_labels),
              "num_classes": num_classes_of(dataset)}
    save_checkpoint(tokens, path)
    return tokens

"""Tokenise a dataset once with a frozen VQGAN and cache the code indices on disk.

Stage 2 trains on these cached indices instead of running the encoder every step. A cache file is
named by a hash of what its tokens depend on: the stage-1 checkpoints' bytes (the image tokenizer's and,
for a conditional prior, the condition tokenizer's) and the data settings.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from utils.checkpoint import read_cached, save_checkpoint

TOKENIZE_BATCH = 256


def default_cache_folder() -> Path:
    """``$VQGAN_TOKEN_CACHE``, else ``$XDG_CACHE_HOME/vqgan/tokens``, else ``~/.cache/vqgan/tokens``."""
    if os.environ.get("VQGAN_TOKEN_CACHE"):
        return Path(os.environ["VQGAN_TOKEN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vqgan" / "tokens"


def cache_key(checkpoints: Sequence[str | Path], settings: dict[str, Any]) -> str:
    """Hash of the stage-1 checkpoints' bytes and of ``settings`` (plain values that change the images)."""
    digest = hashlib.sha256()
    for checkpoint in checkpoints:
        with open(checkpoint, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:16]


ConditionTokenizer = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def tokenize_dataset(vqgan: Any, make_dataset: Callable[[], tuple[Dataset, int]], path: str | Path,
                     device: torch.device, num_workers: int = 0, loader_class: type[DataLoader] = DataLoader,
                     condition: ConditionTokenizer | None = None) -> dict:
    """{"indices": int32 [N, h*w], "labels": long [N], "num_classes": int}, read from ``path`` when it holds
    them; otherwise computed from the (dataset, number of classes) that ``make_dataset`` builds (read in
    order by a ``loader_class``), and written there.

    With ``condition`` (condition maps [B, ...] -> token ids [B, L]) the dataset's items are (image,
    condition map, label) and the result also holds their tokens, "conditions": int32 [N, L]."""
    path = Path(path)
    cached = read_cached(path, "token cache", "tokenising")
    if cached is not None:
        return cached
    dataset, num_classes = make_dataset()
    loader = loader_class(dataset, batch_size=TOKENIZE_BATCH, shuffle=False, num_workers=num_workers)
    all_indices, all_labels, all_conditions = [], [], []
    for images, *maps, labels in tqdm(loader, desc="tokenising", dynamic_ncols=True):
        all_indices.append(vqgan.encode_to_indices(images.to(device)).flatten(1).to(torch.int32).cpu())
        all_labels.append(labels.long())
        if condition is not None:
            all_conditions.append(condition(maps[0].to(device)).to(torch.int32).cpu())
    tokens = {"indices": torch.cat(all_indices), "labels": torch.cat(all_labels), "num_classes": num_classes}
    if condition is not None:
        tokens["conditions"] = torch.cat(all_conditions)
    save_checkpoint(tokens, path)
    return tokens

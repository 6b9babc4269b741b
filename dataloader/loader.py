"""DataLoaders for training and evaluation, and an endless batch iterator that can resume mid-epoch.

Every loader built here is a ``CheckedLoader``: a data error raised inside a worker process comes
back with its own message (torch wraps it in the worker's traceback), and a pass that ends early,
by an error or because the consumer stops, shuts its worker processes down at once.

Every loader built here draws its order from a ``ResumableSampler``: torch's ``DistributedSampler``
(one replica outside distributed runs), whose order depends only on ``(seed, epoch)``, extended so
that an epoch can start part-way through. A resumed run therefore sees exactly the batches the
uninterrupted run would have seen, without loading the skipped ones.
"""

import itertools
import random
import re
import signal
import warnings
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .errors import DataError


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` that leaves out the first ``skip`` indices of the current epoch."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool = True, seed: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip)


def worker_message(err: BaseException) -> str:
    """The message an error had inside a DataLoader worker, without torch's "Caught ... in DataLoader worker
    process N" header and the worker's traceback (the message itself when it was raised in this process)."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    name = re.escape(type(err).__name__)
    last = None
    for last in re.finditer(rf"^(?:[\w.]+\.)?{name}: ", text, flags=re.MULTILINE):
        pass
    return text[last.end():].strip() if last else text


class CheckedLoader(DataLoader):
    """A DataLoader whose passes report worker data errors by their own message and shut the workers down
    when a pass ends early (see the module docstring)."""

    def __iter__(self) -> Iterator[Any]:
        return _checked_pass(self, super().__iter__())


def _checked_pass(loader: DataLoader, iterator: Any) -> Iterator[Any]:
    finished = False
    try:
        yield from iterator
        finished = True
    except DataError as err:
        raise type(err)(worker_message(err)) from None
    finally:
        if not finished:
            _shut_down(loader, iterator)


def _shut_down(loader: DataLoader, iterator: Any) -> None:
    """Stop the worker processes of ``iterator`` now (persistent workers too) instead of at garbage collection."""
    shutdown = getattr(iterator, "_shutdown_workers", None)  # torch's multi-process iterator
    if shutdown is not None:
        shutdown()
    if getattr(loader, "_iterator", None) is iterator:  # a persistent iterator must not be reused
        loader._iterator = None


def _init_worker(worker_id: int) -> None:
    """Seed numpy and ``random`` from the seed torch gave the worker, and leave SIGINT/SIGTERM to the
    main process: a Ctrl-C or a scheduler's SIGTERM sent to the whole process group must not kill
    the workers before the trainer has saved its checkpoint (workers exit when the main process does)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_loader(dataset: Dataset, batch_size: int, *, shuffle: bool = True, num_workers: int = 0,
                 device_type: str = "cpu", drop_last: bool = True, seed: int = 0,
                 distributed: bool = False) -> CheckedLoader:
    """A seeded DataLoader; with ``distributed`` each process of the initialised group gets its own shard.

    ``pin_memory`` is on for CUDA, workers persist between epochs. ``drop_last`` is ignored (with a
    warning) when a process has less than one full batch, so that a loader never yields nothing.
    """
    if distributed:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("build_loader(distributed=True) needs an initialised torch.distributed process "
                               "group; launch with torchrun, or pass distributed=False.")
        replicas, rank = dist.get_world_size(), dist.get_rank()
    else:
        replicas, rank = 1, 0
    sampler = ResumableSampler(dataset, replicas, rank, shuffle=shuffle, seed=seed)
    if drop_last and len(sampler) < batch_size:
        warnings.warn(f"only {len(sampler)} images per process, fewer than one batch of {batch_size}: "
                      f"using smaller batches instead of dropping them all.", stacklevel=2)
        drop_last = False
    worker_seed = int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])
    return CheckedLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=device_type == "cuda", drop_last=drop_last,
                      persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(worker_seed),
                      worker_init_fn=_init_worker if num_workers > 0 else None)


def infinite_batches(loader: DataLoader, start_step: int = 0) -> Iterator[Any]:
    """Yield batches forever, pass after pass, calling the sampler's ``set_epoch`` before each pass.

    ``start_step`` batches are skipped first (to resume a run): whole epochs by arithmetic, the rest
    by the sampler's ``skip`` for loaders from ``build_loader``, else by loading and discarding them.
    """
    sampler = loader.sampler
    resumable = isinstance(sampler, ResumableSampler)
    if resumable:
        sampler.skip = 0
    per_epoch = len(loader)
    if per_epoch == 0:
        raise ValueError("the loader yields no batches: the dataset is empty, or smaller than one batch with "
                         "drop_last.")
    epoch, offset = divmod(start_step, per_epoch)
    while True:
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        discard = offset
        if resumable:
            sampler.skip, discard = offset * loader.batch_size, 0
        for position, batch in enumerate(loader):
            if position >= discard:
                yield batch
        offset = 0
        epoch += 1

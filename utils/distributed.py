"""Data-parallel set-up under ``torchrun``: process group, rank helpers and DDP wrapping."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class DistributedSetupError(RuntimeError):
    """The process group cannot be joined: not launched by torchrun, or the other processes never came."""


LAUNCH_HINT = ("Launch several processes with torchrun (`torchrun --nproc_per_node=N train_vqgan.py ...`, which sets "
               "every variable), or unset WORLD_SIZE to train in one process.")


def _env_int(name: str) -> int:
    text = os.environ[name]
    try:
        return int(text)
    except ValueError:
        raise DistributedSetupError(f"the environment variable {name}={text!r} is not an integer. "
                                    f"{LAUNCH_HINT}") from None


def init_distributed(device_type: str, timeout_s: float = 600.0) -> DistInfo:
    """Join the process group when launched by torchrun (NCCL on CUDA, gloo on CPU).

    Says what it waits for, and gives up after ``timeout_s`` with :class:`DistributedSetupError` when the
    group never fills (a process that was not started, an address that cannot be reached).
    """
    world_size = _env_int("WORLD_SIZE") if "WORLD_SIZE" in os.environ else 1
    if world_size <= 1:
        return DistInfo()
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise DistributedSetupError(f"WORLD_SIZE={world_size} is set, but {' and '.join(missing)} "
                                    f"{'is' if len(missing) == 1 else 'are'} not: this process was not started by "
                                    f"torchrun. {LAUNCH_HINT}")
    info = DistInfo(_env_int("RANK"), world_size, _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0)
    if dist.is_initialized():
        return info
    address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    print(f"rank {info.rank}: waiting for all {world_size} processes to join at {address} (up to {timeout_s:.0f} s, "
          f"train.dist_timeout)", file=sys.stderr, flush=True)
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(info.local_rank)
    try:
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DistributedSetupError(f"rank {info.rank} could not join the group of {world_size} processes at "
                                    f"{address} within {timeout_s:.0f} s ({reason}). Start all {world_size} "
                                    f"processes (torchrun's --nnodes and --nproc_per_node), check that every node "
                                    f"reaches {address}, or raise train.dist_timeout.") from err
    return info


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def on_every_rank(info: DistInfo) -> Iterator[None]:
    """Run the body on every rank, then make a failure on any rank a failure on all of them.

    Without it a rank whose input is missing (a checkpoint or data folder that exists on one node only)
    would fail alone while the others wait in the next collective until the timeout. The failing rank
    raises its own error; every other rank raises :class:`DistributedSetupError` naming the rank, its host
    and its message. The closing exchange is also a barrier.
    """
    if not info.enabled:
        yield
        return
    failure: BaseException | None = None
    try:
        yield
    except Exception as err:  # noqa: BLE001 - re-raised below, after the other ranks have been told
        failure = err
    mine = None if failure is None else f"{type(failure).__name__}: {failure}"
    reports: list[Any] = [None] * info.world_size
    dist.all_gather_object(reports, (socket.gethostname(), mine))
    if failure is not None:
        raise failure
    failed = [(rank, host, message) for rank, (host, message) in enumerate(reports) if message is not None]
    if failed:
        rank, host, message = failed[0]
        raise DistributedSetupError(f"rank {rank} on host {host} stopped before training: {message}")


def broadcast_from_main(value: Any, info: DistInfo) -> Any:
    """Rank 0's ``value`` on every rank (pickled through the process group, so no shared disk is needed)."""
    if not info.enabled:
        return value
    holder = [value if info.is_main else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def replicas_agree(module: torch.nn.Module, info: DistInfo) -> bool:
    """Whether ``module``'s parameters and buffers are bit-identical on every rank (True without DDP)."""
    if not info.enabled:
        return True
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    digests: list[Any] = [None] * info.world_size
    dist.all_gather_object(digests, digest.hexdigest())
    return len(set(digests)) == 1


def wrap_ddp(module: torch.nn.Module, info: DistInfo, device: torch.device,
             sync_buffers_every_step: bool = True) -> torch.nn.Module:
    """Wrap in DistributedDataParallel when running with several processes; otherwise unchanged.

    Parameters and buffers start from rank 0's values. ``sync_buffers_every_step=False`` stops DDP
    from broadcasting rank 0's buffers before every forward (for modules that keep them in sync
    themselves, such as the quantizer's all-reduced statistics).
    """
    if not info.enabled:
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    if sync_buffers_every_step:
        return DDP(module, device_ids=device_ids)
    if "forward_sync_buffers" in inspect.signature(DDP).parameters:
        return DDP(module, device_ids=device_ids, forward_sync_buffers=False)
    for buffer in module.buffers():  # older torch: broadcast_buffers=False also skips the initial sync
        dist.broadcast(buffer, src=0)
    return DDP(module, device_ids=device_ids, broadcast_buffers=False)

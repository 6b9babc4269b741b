"""Data-parallel set-up under ``torchrun``: process group, rank helpers and DDP wrapping."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from datetime import timedelta

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


def init_distributed(device_type: str, timeout_s: float = 600.0) -> DistInfo:
    """Join the process group when launched by torchrun (NCCL on CUDA, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return info


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


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

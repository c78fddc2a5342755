"""torch.distributed set-up for torchrun (NCCL on GPU, gloo on CPU) with timeouts.

A collective that waits longer than ``timeout_s`` raises instead of hanging forever,
so when one process of a run dies the others exit with a message.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but CUDA is not available; use train.device=cpu or auto")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"train.device: expected cpu, cuda or auto, got {name!r}")
    return torch.device(name)


def init_distributed(device: torch.device, timeout_s: float = 600.0) -> tuple[DistInfo, torch.device]:
    """Join the process group described by torchrun's environment variables, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), device
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local_rank), device


def is_comm_failure(e: BaseException) -> bool:
    """Does ``e`` come from a collective or rendezvous that another process left hanging or broke?"""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("gloo", "nccl", "connection reset", "connection closed", "timed out", "timeout"))


def comm_failure_message(e: BaseException, rank: int, timeout_s: float) -> str:
    """One paragraph for the user: what happened, what to look at, how to continue."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return (
        f"process rank {rank}: another process of this distributed run stopped or did not answer within "
        f"train.dist_timeout_s={timeout_s:g} s, so this one stops too. Check the other processes' logs for the "
        f"first error, then restart every process with --resume. ({type(e).__name__}: {first[:300]})"
    )


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

"""Everything distributed in one place: the process's rank, process-group set-up for torchrun
(NCCL on GPU, gloo on CPU, with timeouts), and the collectives the losses use. Every helper
degrades to the single-process identity when no process group exists.

Before the process group is initialised (start-up, logging, run-directory checks) the rank
comes from torchrun's ``RANK`` environment variable; afterwards from torch.distributed.
A collective that waits longer than the set-up's ``timeout_s`` raises instead of hanging,
so when one process of a run dies the others exit with a message.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "is_dist", "rank", "world_size", "is_main_process", "DistInfo", "resolve_device", "init_distributed",
    "cleanup_distributed", "is_comm_failure", "comm_failure_message", "all_gather_with_grad", "all_reduce_sum",
]


def is_dist() -> bool:
    """True when torch.distributed is available and a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank: the process group's, else torchrun's ``RANK``, else 0."""
    return dist.get_rank() if is_dist() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Processes in the initialised group (1 without one)."""
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    """Rank 0: the one process that writes shared files and reports progress."""
    return rank() == 0


# ----------------------------------------------------------------------------- set-up


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
    global_rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(global_rank, world, local_rank), device


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


def cleanup_distributed(wait_for_peers: bool = True) -> None:
    """Leave the process group at the end of a run (torch warns about groups left behind).

    With ``wait_for_peers`` every rank first meets the others at a barrier: a gloo rank that tears
    its connections down while a peer still uses them (rank 0 writing its last files, say) can
    abort the peer with SIGABRT ("terminate called without an active exception"). After a failure
    pass ``False``: the peers may never arrive."""
    if not is_dist():
        return
    if wait_for_peers:
        dist.barrier()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- collectives

class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.local = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Every rank's loss depends on this rank's slice, so sum the slice gradients over ranks;
        # after DDP averages parameter gradients this equals the gradient of the mean rank loss.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.local
        return grad[start : start + ctx.local]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """`(n, ...)` on each rank -> `(world * n, ...)` concatenated in rank order.

    Every rank must pass the same shape. The gradient reaching the local slice is the sum over
    ranks of the gradients w.r.t. that slice. Identity when not distributed or world size 1.
    """
    if not is_dist() or dist.get_world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no autograd); returns `x`. No-op when not distributed."""
    if is_dist() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x

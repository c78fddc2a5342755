"""Thin torch.distributed helpers that degrade to single-process identities."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_dist", "rank", "world_size", "all_gather_with_grad", "all_reduce_sum"]


def is_dist() -> bool:
    """True when torch.distributed is available and a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


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

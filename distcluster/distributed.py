"""Collectives that do nothing when no process group exists.

Gradient convention (what makes N workers equal one process): every loss a
rank returns has, with respect to that rank's own outputs, W times the
gradient of the global single-process loss, so that DDP's gradient
*averaging* over W ranks gives exactly the single-process gradient. Global
statistics built with a differentiable all-reduce satisfy this automatically
(its backward sums the W identical upstream gradients); per-sample terms do
it by taking the mean over the rank's local samples.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

# torch marks torch.distributed.nn.functional deprecated in favour of a private module;
# it is still the public, documented differentiable collective API.
warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed.nn")
warnings.filterwarnings("ignore", message=".*torch.distributed.nn.functional.*deprecated")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous.

    The backward passes of torch.distributed.nn.functional hand their incoming
    gradient straight to the collective; gloo then reads a strided view (say,
    after a transpose) as if it were dense and sums the wrong numbers.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class _SharedSum(torch.autograd.Function):
    """Sum over ranks whose backward needs no collective: every rank's upstream gradient
    is the same (see all_reduce_sum), so the sum of the W ranks' gradients is W times
    this rank's own."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * dist.get_world_size()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks of a global statistic, differentiable, one collective (forward only).

    Only for a statistic that every rank turns into its loss the same way (a joint
    distribution or marginal feeding an entropy or MI term): then the gradient arriving
    at the sum is the same on every rank, and each rank's input gets W times it, as a
    collective backward would give."""
    if not is_distributed():
        return tensor
    return _SharedSum.apply(tensor)


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's (b, ...) tensor along dim 0, differentiable."""
    if not is_distributed():
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat([_ContiguousGrad.apply(t) for t in all_gather(tensor.contiguous())], dim=0)


@torch.no_grad()
def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place reduction without gradient (Sinkhorn sums, metrics)."""
    if is_distributed():
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        dist.all_reduce(tensor, op=ops[op])
    return tensor


@torch.no_grad()
def all_gather_stack(tensor: torch.Tensor) -> torch.Tensor:
    """(W, ...) every rank's copy of `tensor`, in rank order, without gradient."""
    if not is_distributed():
        return tensor.unsqueeze(0)
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts)


def global_offset(local_batch: int) -> int:
    """Index of this rank's first sample in the rank-ordered global batch."""
    return rank() * local_batch

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
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import FunctionCtx

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
    def forward(ctx: FunctionCtx, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class _SharedSum(torch.autograd.Function):
    """Sum over ranks whose backward needs no collective: every rank's upstream gradient
    is the same (see all_reduce_sum), so the sum of the W ranks' gradients is W times
    this rank's own."""

    @staticmethod
    def forward(ctx: FunctionCtx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
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


class _SharedGather(torch.autograd.Function):
    """Every rank's equal-sized tensor joined along `dim`, whose backward needs no collective:
    every rank turns the joined tensor into its loss the same way (see gather_shared), so the
    sum of the W ranks' gradients for this rank's part is W times its own."""

    @staticmethod
    def forward(ctx: FunctionCtx, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        ctx.dim, ctx.local = dim, tensor.shape[dim]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        mine = grad.narrow(ctx.dim, dist.get_rank() * ctx.local, ctx.local)
        return mine * dist.get_world_size(), None


def gather_shared(tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Every rank's `tensor` (all of one shape) joined along `dim` in rank order, differentiable,
    one collective (forward only). As all_reduce_sum, only for what every rank turns into its
    loss the same way: a statistic of the global batch computed on every rank from the gathered
    rows instead of summed from each rank's part, when the rows are the smaller message."""
    if not is_distributed():
        return tensor
    return _SharedGather.apply(tensor, dim)


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


def broadcast_object(value: Any) -> Any:
    """Rank 0's `value` on every rank (pickled: checkpoints and other host-side state)."""
    if not is_distributed():
        return value
    box = [value if rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_first(value: Any) -> list[Any] | None:
    """Every rank's `value` (pickled), in rank order, on rank 0; None on the others."""
    if not is_distributed():
        return [value]
    parts = [None] * world_size() if rank() == 0 else None
    dist.gather_object(value, parts, dst=0)
    return parts


@torch.no_grad()
def broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank: on CPU each worker's BatchNorm
    keeps its own, and this makes every rank hold the same model (at an epoch's end)."""
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def global_offset(local_batch: int) -> int:
    """Index of this rank's first sample in the rank-ordered global batch."""
    return rank() * local_batch


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch, on any backend
    (torch's SyncBatchNorm runs on GPUs only). One differentiable all-reduce per layer (and its backward) of
    (sum, sum of squares, count), accumulated in float64 so that E[x^2] - E[x]^2 keeps its
    digits; running statistics are updated from the same global numbers on every rank. Out
    of training, or without a process group, it is plain BatchNorm."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input (got {input.dim()}-D)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0, *range(2, x.dim())]
        wide = x.double()
        count = torch.full((1,), x.numel() / x.shape[1], dtype=torch.float64, device=x.device)
        local = torch.cat([wide.sum(dims), wide.square().sum(dims), count])
        total = all_reduce(local)
        channels = x.shape[1]
        n = total[-1]
        mean = total[:channels] / n
        var = total[channels:2 * channels] / n - mean.square()
        self._update_running(mean, var, n)
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (wide - mean.view(shape)) / (var.view(shape) + self.eps).sqrt()
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        if not self.track_running_stats:
            return
        self.num_batches_tracked.add_(1)
        momentum = self.momentum if self.momentum is not None else 1 / float(self.num_batches_tracked)
        unbiased = var * n / (n - 1).clamp_min(1)
        self.running_mean.lerp_(mean.to(self.running_mean), momentum)
        self.running_var.lerp_(unbiased.to(self.running_var), momentum)


def global_batchnorm(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm layer replaced by a GlobalBatchNorm holding the same
    parameter and buffer objects (an optimiser built before keeps updating them)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        converted = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                    module.track_running_stats)
        for name, value in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            setattr(converted, name, value)
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, global_batchnorm(child))
    return module

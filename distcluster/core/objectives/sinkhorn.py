"""Sinkhorn-Knopp equal-partition codes (SwAV, arXiv 2006.09882, Alg. 1), in the log domain."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from distcluster.core import distributed as dist
from distcluster.core.objectives.base import wide

# Global score tables up to this many numbers are gathered whole (one collective per call);
# larger ones are reduced at every iteration (small messages, but one wait each).
GATHER_LIMIT = 1 << 20


def _logsumexp_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """log sum_j exp(x[..., j]) over the columns of every rank's x (..., P, b) -> (..., P, 1).

    One collective: every rank shares its own (max, sum of exp below it) per row, and
    the pairs combine exactly into the global log-sum-exp."""
    top = x.max(dim=-1, keepdim=True).values
    total = (x - top).exp().sum(dim=-1, keepdim=True)
    tops, totals = dist.all_gather_stack(torch.stack([top, total])).unbind(1)  # (W, ..., P, 1) each
    best = tops.max(dim=0).values
    return best + (totals * (tops - best).exp()).sum(dim=0).log()


def _local_logsumexp(x: torch.Tensor) -> torch.Tensor:
    return x.logsumexp(dim=-1, keepdim=True)


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3,
             gather_limit: int = GATHER_LIMIT) -> torch.Tensor:
    """Soft codes for scores (..., b, P) -> (..., b, P); each row sums to 1. Leading
    dimensions are independent problems (the two large crops) solved together.

    Alternately normalises Q = exp(scores / epsilon) so that each prototype
    receives B/P of the global batch and each sample a total of 1. Under a
    process group the codes equal those of one process holding the whole batch
    (every rank holds b of the B samples): when the global scores have at most
    `gather_limit` numbers, every rank gathers them all at once and solves the
    whole problem, keeping its own rows; otherwise the prototype totals are
    combined over ranks at every iteration. Working with log Q keeps
    exp(scores / epsilon) from overflowing or underflowing to 0/0. No gradient.
    """
    if not dist.is_distributed():
        return _solve(scores, epsilon, iterations, _local_logsumexp, 1)
    if scores.numel() * dist.world_size() > gather_limit:
        return _solve(scores, epsilon, iterations, _logsumexp_over_ranks, dist.world_size())
    local = scores.shape[-2]
    everyone = torch.cat(list(dist.all_gather_stack(wide(scores))), dim=-2)  # rank order
    codes = _solve(everyone, epsilon, iterations, _local_logsumexp, 1)
    first = dist.global_offset(local)
    return codes[..., first:first + local, :]


def _solve(scores: torch.Tensor, epsilon: float, iterations: int,
           row_logsumexp: Callable[[torch.Tensor], torch.Tensor], shards: int) -> torch.Tensor:
    """Sinkhorn on scores (..., b, P) that are one of `shards` equal shards of the batch;
    `row_logsumexp` sums a prototype's row over the whole batch."""
    log_q = wide(scores).transpose(-1, -2) / epsilon  # (..., P, b)
    num_prototypes = log_q.shape[-2]
    log_global_batch = math.log(log_q.shape[-1] * shards)
    for _ in range(iterations):
        # After this step each prototype row sums to 1/P ...
        log_q = log_q - row_logsumexp(log_q) - math.log(num_prototypes)
        # ... and after this one each sample column sums to 1/B.
        log_q = log_q - log_q.logsumexp(dim=-2, keepdim=True) - log_global_batch
    return (log_q + log_global_batch).exp().transpose(-1, -2)

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
             gather_limit: int = GATHER_LIMIT, queued: torch.Tensor | None = None,
             relaxation: float = 1.0) -> torch.Tensor:
    """Soft codes for scores (..., b, P) -> (..., b, P); each row sums to 1. Leading
    dimensions are independent problems (the two large crops) solved together.

    Alternately normalises Q = exp(scores / epsilon) so that each prototype
    receives an equal share of the global batch and each sample a total of 1. Under a
    process group the codes equal those of one process holding the whole batch
    (every rank holds b of the B samples): when the global scores have at most
    `gather_limit` numbers, every rank gathers them all at once and solves the
    whole problem, keeping its own rows; otherwise the prototype totals are
    combined over ranks at every iteration. `queued` (..., L, P), the same on every
    rank, are scores of earlier samples (SwAV's queue) that join the problem once:
    the prototypes then share B + L samples, which keeps codes of a small batch from
    being forced towards uniform. `relaxation` r < 1 makes the prototypes' equal shares a
    KL-relaxed constraint (unbalanced transport: each prototype scaling raised to the power r,
    as in Chizat et al.'s scaling algorithm; 0 leaves the prototypes free); the samples' totals
    stay exact. Working with log Q keeps exp(scores / epsilon) from overflowing or underflowing
    to 0/0. No gradient.
    """
    queued = scores[..., :0, :] if queued is None else queued.to(scores)
    extra, world = queued.shape[-2], dist.world_size()
    if world == 1 or scores.numel() * world + queued.numel() > gather_limit:
        problem = torch.cat([queued, scores], dim=-2) if extra else scores
        row_sum = _local_logsumexp if world == 1 else _logsumexp_over_ranks
        return _solve(problem, epsilon, iterations, row_sum, extra, world, relaxation)
    local = scores.shape[-2]
    everyone = torch.cat([queued, *dist.all_gather_stack(wide(scores))], dim=-2)  # queue, then rank order
    codes = _solve(everyone, epsilon, iterations, _local_logsumexp, extra + dist.global_offset(local),
                   relaxation=relaxation)
    return codes[..., :local, :]


def _solve(scores: torch.Tensor, epsilon: float, iterations: int,
           row_logsumexp: Callable[[torch.Tensor], torch.Tensor], queued: int,
           shards: int = 1, relaxation: float = 1.0) -> torch.Tensor:
    """Codes of the rows after the first `queued` of scores (..., queued + b, P): the first
    `queued` rows (the same on every rank) join the problem once, the other b are one of
    `shards` equal shards of the batch, whose prototype sums `row_logsumexp` takes over ranks.
    With `relaxation` r < 1 the prototype scaling u is the unbalanced one, u = (a / K v)^r:
    log u is kept to take the previous scaling out of the row sums."""
    log_q = wide(scores).transpose(-1, -2) / epsilon  # (..., P, queued + b)
    num_prototypes = log_q.shape[-2]
    local = log_q.shape[-1] - queued
    log_total = math.log(local * shards + queued)
    log_u = torch.zeros_like(log_q[..., :1])  # the prototype scaling so far
    for _ in range(iterations):
        # After this step each prototype row sums to 1/P ...
        row = row_logsumexp(log_q[..., queued:])
        if queued:
            row = torch.logaddexp(row, log_q[..., :queued].logsumexp(dim=-1, keepdim=True))
        if relaxation == 1.0:
            log_q = log_q - row - math.log(num_prototypes)
        else:
            step = -relaxation * (row + math.log(num_prototypes)) - (1 - relaxation) * log_u
            log_q, log_u = log_q + step, log_u + step
        # ... and after this one each sample column sums to 1/(B + L).
        log_q = log_q - log_q.logsumexp(dim=-2, keepdim=True) - log_total
    return (log_q[..., queued:] + log_total).exp().transpose(-1, -2)

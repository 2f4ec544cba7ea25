"""Sinkhorn-Knopp equal-partition codes (SwAV, arXiv 2006.09882, Alg. 1), in the log domain."""

from __future__ import annotations

import math

import torch

from distcluster import distributed as dist


def _global_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """log sum_j exp(x[..., j]) over the columns of every rank's x (..., P, b) -> (..., P, 1).

    One collective: every rank shares its own (max, sum of exp below it) per row, and
    the pairs combine exactly into the global log-sum-exp."""
    top = x.max(dim=-1, keepdim=True).values
    total = (x - top).exp().sum(dim=-1, keepdim=True)
    if not dist.is_distributed():
        return top + total.log()
    tops, totals = dist.all_gather_stack(torch.stack([top, total])).unbind(1)  # (W, ..., P, 1) each
    best = tops.max(dim=0).values
    return best + (totals * (tops - best).exp()).sum(dim=0).log()


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Soft codes for scores (..., b, P) -> (..., b, P); each row sums to 1. Leading
    dimensions are independent problems (the two large crops) solved together.

    Alternately normalises Q = exp(scores / epsilon) so that each prototype
    receives B/P of the global batch and each sample a total of 1. Under a
    process group the prototype totals are combined over ranks (one collective per
    iteration; every rank holds b of the B samples), so the codes equal those of one
    process holding the whole batch. Working with log Q keeps exp(scores / epsilon)
    from overflowing or underflowing to 0/0. No gradient.
    """
    log_q = scores.float().transpose(-1, -2) / epsilon  # (..., P, b)
    num_prototypes = log_q.shape[-2]
    log_global_batch = math.log(log_q.shape[-1] * dist.world_size())
    for _ in range(iterations):
        # After this step each prototype row sums to 1/P ...
        log_q = log_q - _global_logsumexp(log_q) - math.log(num_prototypes)
        # ... and after this one each sample column sums to 1/B.
        log_q = log_q - log_q.logsumexp(dim=-2, keepdim=True) - log_global_batch
    return (log_q + log_global_batch).exp().transpose(-1, -2)

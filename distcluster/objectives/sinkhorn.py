"""Sinkhorn-Knopp equal-partition codes (SwAV, arXiv 2006.09882, Alg. 1), in the log domain."""

from __future__ import annotations

import math

import torch

from distcluster import distributed as dist


def _global_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """log sum_j exp(x[:, j]) over the columns of every rank's x (P, b) -> (P, 1)."""
    top = dist.all_reduce_(x.max(dim=1, keepdim=True).values.clone(), op="max")
    return top + dist.all_reduce_((x - top).exp().sum(dim=1, keepdim=True)).log()


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Soft codes for scores (B, P) -> (B, P); each row sums to 1.

    Alternately normalises Q = exp(scores / epsilon) so that each prototype
    receives B/P of the global batch and each sample a total of 1. Under a
    process group the prototype totals are all-reduced, so the codes equal
    those of one process holding the whole batch. Working with log Q keeps
    exp(scores / epsilon) from overflowing or underflowing to 0/0. No gradient.
    """
    log_q = scores.float().t() / epsilon  # (P, b)
    num_prototypes = log_q.shape[0]
    global_batch = dist.all_reduce_(torch.tensor(float(log_q.shape[1]), device=log_q.device))
    for _ in range(iterations):
        # After this step each prototype row sums to 1/P ...
        log_q = log_q - _global_logsumexp(log_q) - math.log(num_prototypes)
        # ... and after this one each sample column sums to 1/B.
        log_q = log_q - log_q.logsumexp(dim=0, keepdim=True) - global_batch.log()
    return (log_q + global_batch.log()).exp().t()

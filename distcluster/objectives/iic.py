"""IIC: Invariant Information Clustering (Ji et al., arXiv 1807.06653, eq. 3)."""

from __future__ import annotations

import torch
from torch import nn

from distcluster import distributed as dist
from distcluster.config import IICConfig
from distcluster.models import ClusterHead
from distcluster.objectives.base import EPS, ObjectiveResult, pairs


def iic_loss(z_a: torch.Tensor, z_b: torch.Tensor, lamb: float = 1.0) -> torch.Tensor:
    """-I(z_a; z_b) with marginal weight `lamb`; z_a, z_b: (B, K) probabilities.

    P = (1/B) sum_i z_a_i z_b_i^T, symmetrised; L = -sum P (log P - lamb log P_r - lamb log P_c).
    Under a process group P is the joint over the global batch.
    """
    return iic_from_joints(global_joints(z_a.unsqueeze(0), z_b.unsqueeze(0)), lamb)[0]


def global_joints(z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
    """(..., B, K) pairs of probabilities -> (..., K, K) joints over the global batch.

    One all-reduce for every pair and sub-head together. Every row of z_a and z_b sums
    to 1, so each joint sums to the global batch size: dividing by that sum normalises
    it without a second collective for the batch size.
    """
    joint = dist.all_reduce_sum(z_a.float().transpose(-1, -2) @ z_b.float())
    return joint / joint.sum(dim=(-2, -1), keepdim=True)


def iic_from_joints(joint: torch.Tensor, lamb: float) -> torch.Tensor:
    """(..., K, K) unsymmetrised joints -> (...) IIC losses."""
    joint = ((joint + joint.transpose(-1, -2)) / 2).clamp_min(EPS)
    rows = joint.sum(dim=-1, keepdim=True)
    cols = joint.sum(dim=-2, keepdim=True)
    return -(joint * (joint.log() - lamb * rows.log() - lamb * cols.log())).sum((-1, -2))


class IIC(nn.Module):
    """Main head (K clusters) + over-clustering head, each with `subheads` linear heads.

    Both heads are trained every step (the paper alternates by epoch; summing is
    the same objective in expectation and keeps every rank's graph identical).
    The loss is averaged over all ordered pairs of crops.
    """

    def __init__(self, feature_dim: int, clusters: int, cfg: IICConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.main = ClusterHead(feature_dim, clusters, cfg.subheads)
        self.over = ClusterHead(feature_dim, cfg.overclusters, cfg.subheads)

    def loss(self, features: list[torch.Tensor], step: int = 0) -> ObjectiveResult:
        main = [self.main(f).float().softmax(-1) for f in features]  # each (S, B, K)
        over = [self.over(f).float().softmax(-1) for f in features]
        view_pairs = pairs(len(features))
        per_head_main = self._pair_mean(main, view_pairs)  # (S,)
        per_head_over = self._pair_mean(over, view_pairs)
        loss = per_head_main.mean() + per_head_over.mean()
        logs = {"iic_main": per_head_main.mean().detach(), "iic_over": per_head_over.mean().detach()}
        return ObjectiveResult(loss, logs, per_head_main.detach())

    def _pair_mean(self, probs: list[torch.Tensor], view_pairs: list[tuple[int, int]]) -> torch.Tensor:
        """(S,) loss of each sub-head, averaged over view pairs (symmetric, so i < j only)."""
        firsts = torch.stack([probs[i] for i, j in view_pairs if i < j])  # (P, S, B, K)
        seconds = torch.stack([probs[j] for i, j in view_pairs if i < j])
        return iic_from_joints(global_joints(firsts, seconds), self.cfg.lamb).mean(0)

    def cluster_probs(self, features: torch.Tensor) -> torch.Tensor:
        return self.main(features).float().softmax(-1)

"""Entropy and mutual information of probability tables, the quantities all three objectives
are built from (docs/methods.md)."""

from __future__ import annotations

import torch

EPS = 1e-8  # the floor under probabilities that are logged


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) over the last axis; probs: (..., K)."""
    return -(probs * probs.clamp_min(EPS).log()).sum(-1)


def weighted_information(joint: torch.Tensor, row_weight: float, col_weight: float) -> torch.Tensor:
    """-sum_ij P_ij (log P_ij - a log P_i - b log P_j) of joints P (..., R, C) that sum to 1,
    with a = row_weight, b = col_weight; returns (...).

    a = b = 1 gives -I(rows; cols). Weights above 1 also reward spread-out marginals, since
    the loss is then -I - (a - 1) H(rows) - (b - 1) H(cols): IIC's lambda on both sides
    (Ji et al., eq. 3), IMC-SwAV's H(Y|U) - b H(Y) with a = b on the classifier's side and
    1 on the prototypes' (Ntelemis et al., eq. 7).
    """
    rows = joint.sum(dim=-1, keepdim=True)
    cols = joint.sum(dim=-2, keepdim=True)

    def log(p: torch.Tensor) -> torch.Tensor:
        return p.clamp_min(EPS).log()

    return -(joint * (log(joint) - row_weight * log(rows) - col_weight * log(cols))).sum((-2, -1))

"""What every objective returns, and small helpers they share."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

EPS = 1e-8


@dataclass
class ObjectiveResult:
    """loss: scalar to minimise; logs: detached parts for metrics (`swav`, `mi`, ...);
    subhead_losses: (S,) detached per-sub-head losses, used to pick a head without labels."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)
    subhead_losses: torch.Tensor | None = None


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) over the last axis; probs: (..., K)."""
    return -(probs * probs.clamp_min(EPS).log()).sum(-1)


def logit_penalty(logits: torch.Tensor, bound: float) -> torch.Tensor:
    """Mean over samples of sum_k relu(|logit| - bound): keeps logits from running away."""
    return F.relu(logits.abs() - bound).sum(-1).mean()


def wide(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or left in float64: batch statistics need at least single precision
    (the backbone may run in bf16), and the float64 reference tests need their digits."""
    return x if x.dtype == torch.float64 else x.float()

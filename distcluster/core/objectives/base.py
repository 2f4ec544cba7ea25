"""What every objective is and returns, and small helpers they share."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from distcluster.core.objectives.prior import ClusterPrior


@dataclass
class ObjectiveResult:
    """loss: scalar to minimise; logs: detached parts for metrics (`swav`, `mi`, ...);
    subhead_losses: (S,) detached per-sub-head losses, used to pick a head without labels."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)
    subhead_losses: torch.Tensor | None = None


@runtime_checkable
class Objective(Protocol):
    """What the training loop asks of an objective (an nn.Module holding its heads)."""

    def loss(self, features: list[torch.Tensor], step: int, epoch: int) -> ObjectiveResult:
        """features: the backbone's (B, D) features of every crop, in crop order; `step`
        (optimiser updates so far) and `epoch` drive schedules inside the objective."""

    prior: ClusterPrior  # the cluster sizes it pulls towards, refitted by the loop after each epoch

    def cluster_probs(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) features of whole images -> (S, B, K) probabilities of the S sub-heads, as
        assigned (under `prior: calibrated`, with the prior's shift)."""

    def on_after_backward(self, step: int) -> None:
        """Between backward and the update (IMC-SwAV: frozen prototypes drop their gradient)."""

    def on_step_end(self, applied: torch.Tensor) -> None:
        """After the update; `applied` is 1 when it was made, 0 when the step was skipped (a 0-d
        tensor on the device): a skipped step must leave the objective as it was (IMC-SwAV:
        prototypes back onto the sphere after an update)."""


class ObjectiveModule(nn.Module):
    """Base of the packaged objectives: the per-step hooks of Objective, doing nothing."""

    def on_after_backward(self, step: int) -> None:
        pass

    def on_step_end(self, applied: torch.Tensor) -> None:
        pass


class ArgumentError(ValueError):
    """An objective's constructor argument out of its range; names the argument."""

    def __init__(self, owner: str, argument: str, value: object, rule: str) -> None:
        super().__init__(f"{owner}: {argument} {rule} (got {value!r})")
        self.argument, self.value, self.rule = argument, value, rule


def argument(default: Any, doc: str) -> Any:
    """A field of an objective's arguments: the paper's default and the one line the reference
    docs print for it (docs/reference.md is generated from these)."""
    return field(default=default, metadata={"doc": doc})


Arguments = TypeVar("Arguments")


def settle(cls: type[Arguments], given: Arguments | None, overrides: dict[str, Any]) -> Arguments:
    """`given` (or the defaults of `cls`) with `overrides` applied, validated: the arguments an
    objective's constructor takes either as one typed object or as keywords."""
    arguments = dataclasses.replace(given if given is not None else cls(), **overrides)
    arguments.validate()
    return arguments


def require(ok: bool, owner: str, argument: str, value: object, rule: str) -> None:
    if not ok:
        raise ArgumentError(owner, argument, value, rule)


def require_sizes(owner: str, feature_dim: int, clusters: int) -> None:
    require(feature_dim >= 1, owner, "feature_dim", feature_dim, "must be >= 1")
    require(clusters >= 2, owner, "clusters", clusters, "must be >= 2")


def logit_penalty(logits: torch.Tensor, bound: float) -> torch.Tensor:
    """Mean over samples of sum_k relu(|logit| - bound): keeps logits from running away."""
    return F.relu(logits.abs() - bound).sum(-1).mean()


def wide(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or left in float64: batch statistics need at least single precision
    (the backbone may run in bf16), and the float64 reference tests need their digits."""
    return x if x.dtype == torch.float64 else x.float()

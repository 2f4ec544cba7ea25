"""CRLC (Do et al., arXiv 2107.11635): contrastive representation + probability InfoNCE."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distcluster.core import distributed as dist
from distcluster.core.heads import ClusterHead, mlp
from distcluster.core.information import EPS, entropy
from distcluster.core.objectives.base import (
    ObjectiveModule,
    ObjectiveResult,
    argument,
    require,
    require_sizes,
    settle,
    wide,
)
from distcluster.core.objectives.prior import ClusterPrior


@dataclass
class CRLCArguments:
    """CRLC's arguments with the paper's defaults (config section `crlc`)."""

    subheads: int = argument(10, "cluster sub-heads; the one with the lowest loss is kept")
    hidden: int = argument(512, "hidden units of each sub-head and of the representation head")
    projection_dim: int = argument(128, "output of the representation head (its NT-Xent features)")
    temperature: float = argument(0.1, "NT-Xent temperature of the feature InfoNCE")
    smoothing: float = argument(0.01, "probabilities smoothed towards uniform in the probability InfoNCE")
    entropy_weight: float = argument(2.0, "weight of the marginal entropy: the pull towards balanced "
                                     "clusters")
    feature_weight: float = argument(10.0, "weight of the feature InfoNCE")
    logit_bound: float = argument(25.0, "|logit| allowed before the penalty starts")
    logit_penalty: float = argument(0.01, "weight of the penalty on logits past logit_bound")

    def validate(self) -> None:
        """ArgumentError naming the first argument out of range."""
        for name in ("subheads", "hidden", "projection_dim"):
            require(getattr(self, name) >= 1, "CRLC", name, getattr(self, name), "must be >= 1")
        require(self.temperature > 0, "CRLC", "temperature", self.temperature, "must be > 0")
        require(0 <= self.smoothing < 1, "CRLC", "smoothing", self.smoothing, "must be in [0, 1)")
        for name in ("entropy_weight", "feature_weight", "logit_bound", "logit_penalty"):
            require(getattr(self, name) >= 0, "CRLC", name, getattr(self, name), "must be >= 0")


def _two_view_nce(view_a: torch.Tensor, view_b: torch.Tensor, critic) -> torch.Tensor:
    """InfoNCE over the 2B views of a global batch; the positive is the other view.

    view_a, view_b: (..., b, d) local rows; keys are gathered from every rank with
    gradient. Returns the mean over this rank's 2b anchors, shape (...).
    """
    local = view_a.shape[-2]
    keys_a = _gather_rows(view_a)
    keys_b = _gather_rows(view_b)
    total = keys_a.shape[-2]
    anchors = torch.cat([view_a, view_b], dim=-2)  # (..., 2b, d)
    logits = critic(anchors, torch.cat([keys_a, keys_b], dim=-2))  # (..., 2b, 2B)
    own = dist.global_offset(local) + torch.arange(local, device=view_a.device)
    self_index = torch.cat([own, own + total])
    positive = torch.cat([own + total, own])
    rows = torch.arange(2 * local, device=view_a.device)
    logits = logits.clone()
    logits[..., rows, self_index] = float("-inf")
    log_prob = logits.log_softmax(-1)[..., rows, positive]
    return -log_prob.mean(-1)


def _gather_rows(x: torch.Tensor) -> torch.Tensor:
    """All-gather along the sample axis (-2) with gradient."""
    moved = x.movedim(-2, 0)
    return dist.all_gather_cat(moved.contiguous()).movedim(0, -2)


def nt_xent(r_a: torch.Tensor, r_b: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR's NT-Xent; r_a, r_b: (..., B, d) L2-normalised features of two views -> (...)."""
    return _two_view_nce(wide(r_a), wide(r_b), lambda q, k: q @ k.transpose(-2, -1) / temperature)


def crlc_cluster_nce(p_a: torch.Tensor, p_b: torch.Tensor) -> torch.Tensor:
    """InfoNCE with the log-of-dot-product critic f(p_i, p_j) = log(p_i^T p_j).

    p_a, p_b: (..., B, K) cluster probabilities of two views (already smoothed).
    """
    return _two_view_nce(wide(p_a), wide(p_b),
                         lambda q, k: (q @ k.transpose(-2, -1)).clamp_min(EPS).log())


def view_pairs(views: int) -> tuple[list[int], list[int]]:
    """The pairs of crops CRLC contrasts, as (first, second) index lists: the first two crops
    with each other and every later crop (multi-crop, as SwAV's small crops) with each of the
    first two. Two crops give the paper's one pair."""
    later = range(2, views)
    return [0] + [i for _ in later for i in (0, 1)], [1] + [j for j in later for _ in (0, 1)]


def global_mean_probs(probs: torch.Tensor) -> torch.Tensor:
    """Mean over the global batch of probs (..., b, K) -> (..., K), differentiable. Every
    row sums to 1, so the summed rows sum to the global batch size: dividing by that
    normalises without a second collective for the batch size."""
    total = dist.all_reduce_sum(wide(probs).sum(-2))
    return total / total.sum(-1, keepdim=True)


def violation_penalty(logits: torch.Tensor, bound: float) -> torch.Tensor:
    """CRLC's logit clamp, mean over samples of sum_k logit * sg(violation), violation the
    distance past +-bound (0 inside): its gradient is the violation itself, so it grows
    with the distance. logits: (..., B, K) -> (...)."""
    violation = (logits - logits.clamp(-bound, bound)).detach()
    return (logits * violation).sum(-1).mean(-1)


class CRLC(ObjectiveModule):
    """Representation head (NT-Xent at `temperature`, weight `feature_weight`) + `subheads`
    cluster sub-heads (MLPs with `hidden` units).

    As the authors' code, per sub-head: the probability InfoNCE on probabilities smoothed
    towards uniform by `smoothing`, minus entropy_weight * (H(mean p_a) + H(mean p_b)) / 2
    on the unsmoothed ones (one marginal per view, over the global batch), plus
    logit_penalty * violation_penalty(logits, logit_bound). The defaults are the paper's.
    With more than two crops both InfoNCE terms are averaged over the pairs of `view_pairs`
    and the balance term over all views (our multi-crop extension; two crops: the paper's).
    """

    def __init__(self, feature_dim: int, clusters: int, arguments: CRLCArguments | None = None, *,
                 prior: str = "uniform", **overrides: object) -> None:
        super().__init__()
        require_sizes("CRLC", feature_dim, clusters)
        args = settle(CRLCArguments, arguments, overrides)
        self.temperature, self.smoothing = args.temperature, args.smoothing
        self.entropy_weight = args.entropy_weight
        self.feature_weight, self.logit_bound = args.feature_weight, args.logit_bound
        self.logit_penalty = args.logit_penalty
        self.representation = mlp([feature_dim, args.hidden, args.projection_dim], batch_norm=False)
        self.cluster = ClusterHead(feature_dim, clusters, args.subheads, args.hidden)
        self.prior = ClusterPrior(clusters, prior, args.subheads)

    def loss(self, features: list[torch.Tensor], step: int = 0, epoch: int = 0) -> ObjectiveResult:
        views = torch.stack(features)  # (V, b, D): the crops, of any sizes, in crop order
        first, second = view_pairs(len(features))
        r = F.normalize(self.representation(views), dim=-1)  # (V, b, d)
        feature_nce = nt_xent(r[first], r[second], self.temperature).mean()

        logits = wide(torch.stack([self.cluster(f) for f in features]))  # (V, S, b, K)
        probs = logits.softmax(-1)
        smoothed = self._smooth(probs)
        cluster_nce = crlc_cluster_nce(smoothed[first], smoothed[second]).mean(0)  # (S,)
        marginals = global_mean_probs(probs)  # (V, S, K): one per view
        balance = entropy(marginals).mean(0)  # (S,): mean over the views
        sizes = self.prior.correction(marginals)  # (V, S), zeros under the uniform prior: prior.py
        penalty = violation_penalty(logits, self.logit_bound).mean(0)  # (S,)
        per_head = (cluster_nce - self.entropy_weight * balance + self.entropy_weight * sizes.mean(0)
                    + self.logit_penalty * penalty)
        loss = self.feature_weight * feature_nce + per_head.mean()
        logs = {"feature_nce": feature_nce.detach(), "cluster_nce": cluster_nce.mean().detach(),
                "marginal_entropy": balance.mean().detach()}
        return ObjectiveResult(loss, logs, per_head.detach())

    def _smooth(self, probs: torch.Tensor) -> torch.Tensor:
        a = self.smoothing
        return (1 - a) * probs + a / probs.shape[-1]

    def cluster_probs(self, features: torch.Tensor) -> torch.Tensor:
        return self.prior.assigned(self.cluster(features)).softmax(-1)

"""IIC: Invariant Information Clustering (Ji et al., arXiv 1807.06653, eq. 3)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from distcluster.core import distributed as dist
from distcluster.core.heads import ClusterHead
from distcluster.core.information import EPS, weighted_information
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
class IICArguments:
    """IIC's arguments with the paper's defaults (config section `iic`)."""

    overclusters: int = argument(70, "clusters of the over-clustering head")
    subheads: int = argument(5, "sub-heads of each head; the one with the lowest loss is kept")
    lamb: float = argument(1.0, "marginal weight; > 1 pushes towards balanced clusters")
    pairing: str = argument("anchor", "anchor: every (x, g(x)) pair pooled into one joint (the authors' "
                            "code); all_pairs: one loss per pair of crops, averaged")
    head_epochs: tuple[int, int] = argument((1, 2), "epochs of the over-clustering head, then of the "
                                            "main head, taking turns; [0, 0]: both every step")

    def validate(self) -> None:
        """ArgumentError naming the first argument out of range."""
        require(self.overclusters >= 2, "IIC", "overclusters", self.overclusters, "must be >= 2")
        require(self.subheads >= 1, "IIC", "subheads", self.subheads, "must be >= 1")
        require(self.lamb > 0, "IIC", "lamb", self.lamb, "must be > 0")
        require(self.pairing in ("anchor", "all_pairs"), "IIC", "pairing", self.pairing,
                "must be anchor or all_pairs")
        over, main = self.head_epochs
        require((over >= 1 and main >= 1) or over == main == 0, "IIC", "head_epochs",
                list(self.head_epochs), "must be two counts >= 1, or [0, 0] for both heads every step")


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
    joint = dist.all_reduce_sum(wide(z_a).transpose(-1, -2) @ wide(z_b))
    return joint / joint.sum(dim=(-2, -1), keepdim=True)


def iic_from_joints(joint: torch.Tensor, lamb: float, prior: ClusterPrior | None = None) -> torch.Tensor:
    """(..., K, K) unsymmetrised joints -> (...) IIC losses; a `prior` (of the (..., K)
    marginals) corrects both marginal terms."""
    joint = ((joint + joint.transpose(-1, -2)) / 2).clamp_min(EPS)  # as the authors' code
    loss = weighted_information(joint, lamb, lamb)
    if prior is None:
        return loss
    marginal = joint.sum(-1) / joint.sum((-2, -1)).unsqueeze(-1)  # rows and columns alike
    return loss + 2 * lamb * prior.correction(marginal)  # zeros under the uniform prior


class IIC(ObjectiveModule):
    """Main head (`clusters`) + over-clustering head (`overclusters`), each with `subheads`
    linear heads; `lamb` weighs the marginals (> 1 pushes towards balanced clusters).

    features[0] is the anchor view x, every later crop a transformed view g(x). With
    `pairing="anchor"` (the authors' code) the (x, g(x)) pairs of all crops are pooled into
    one joint per sub-head; with "all_pairs" each pair of crops has its own loss and they
    are averaged. The heads take turns by epoch: the over-clustering head for
    head_epochs[0] epochs, then the main head for head_epochs[1] ((0, 0): both every step).
    The resting head's loss enters with weight 0, so it gets zero gradients (as the
    authors' zeroed gradients: Adam still carries its momentum) and every rank's graph is
    the same. The defaults are the paper's.
    """

    def __init__(self, feature_dim: int, clusters: int, arguments: IICArguments | None = None, *,
                 prior: str = "uniform", **overrides: object) -> None:
        super().__init__()
        require_sizes("IIC", feature_dim, clusters)
        args = settle(IICArguments, arguments, overrides)
        self.lamb, self.pairing, self.head_epochs = args.lamb, args.pairing, tuple(args.head_epochs)
        self.main = ClusterHead(feature_dim, clusters, args.subheads)
        self.over = ClusterHead(feature_dim, args.overclusters, args.subheads)
        self.prior = ClusterPrior(clusters, prior, args.subheads)  # over-clusters stay equal in size

    def loss(self, features: list[torch.Tensor], step: int = 0, epoch: int = 0) -> ObjectiveResult:
        main = torch.stack([wide(self.main(f)).softmax(-1) for f in features])  # (V, S, B, K)
        over = torch.stack([wide(self.over(f)).softmax(-1) for f in features])
        per_head_main, per_head_over = self.per_subhead(main, self.prior), self.per_subhead(over)  # (S,)
        weight_main, weight_over = self.head_weights(epoch)
        loss = weight_main * per_head_main.mean() + weight_over * per_head_over.mean()
        logs = {"iic_main": per_head_main.mean().detach(), "iic_over": per_head_over.mean().detach()}
        return ObjectiveResult(loss, logs, per_head_main.detach())

    def per_subhead(self, probs: torch.Tensor, prior: ClusterPrior | None = None) -> torch.Tensor:
        """(V, S, B, K) probabilities of every crop -> (S,) loss of each sub-head."""
        if self.pairing == "anchor":
            anchors = probs[:1].expand_as(probs[1:])
            # Every pair holds the same B samples, so the mean of the normalised joints is
            # the joint of all the pairs pooled.
            return iic_from_joints(global_joints(anchors, probs[1:]).mean(0), self.lamb, prior)
        firsts, seconds = zip(*itertools.combinations(probs, 2), strict=True)  # IIC is symmetric
        joints = global_joints(torch.stack(firsts), torch.stack(seconds))
        return iic_from_joints(joints, self.lamb, prior).mean(0)

    def head_weights(self, epoch: int) -> tuple[float, float]:
        """(main, over-clustering) weights in this epoch: the over-clustering head trains for
        head_epochs[0] epochs, then the main head for head_epochs[1], and again."""
        over_epochs, main_epochs = self.head_epochs
        if over_epochs == 0:
            return 1.0, 1.0
        main_turn = epoch % (over_epochs + main_epochs) >= over_epochs
        return (1.0, 0.0) if main_turn else (0.0, 1.0)

    def cluster_probs(self, features: torch.Tensor) -> torch.Tensor:
        return self.prior.assigned(wide(self.main(features))).softmax(-1)

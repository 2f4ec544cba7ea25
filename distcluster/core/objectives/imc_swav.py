"""IMC-SwAV (Ntelemis et al., arXiv 2103.07368): SwAV self-labelling + MI(classifier; prototypes)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distcluster.core import distributed as dist
from distcluster.core.heads import Prototypes, mlp
from distcluster.core.information import weighted_information
from distcluster.core.objectives.base import (
    ObjectiveModule,
    ObjectiveResult,
    argument,
    logit_penalty,
    require,
    require_sizes,
    settle,
    wide,
)
from distcluster.core.objectives.prior import ClusterPrior
from distcluster.core.objectives.sinkhorn import sinkhorn


@dataclass
class IMCSwAVArguments:
    """IMC-SwAV's arguments with the paper's defaults (config section `imc_swav`)."""

    prototypes: int = argument(1000, "SwAV prototypes P")
    projection_hidden: int = argument(512, "hidden units of the projection")
    projection_dim: int = argument(128, "dimension of the projected, normalised embedding")
    classifier_hidden: int = argument(1024, "hidden units of the classifier's two hidden layers")
    temperature: float = argument(0.1, "softmax temperature of the prototype scores")
    epsilon: float = argument(0.05, "Sinkhorn's entropic regularisation")
    sinkhorn_iterations: int = argument(3, "Sinkhorn iterations per step")
    entropy_weight: float = argument(4.0, "b in H(Y|U) - b H(Y): the pull towards balanced clusters")
    logit_penalty: float = argument(0.01, "weight of the penalty on classifier logits past logit_bound")
    logit_bound: float = argument(5.0, "|logit| allowed before the penalty starts")
    freeze_prototypes_steps: int = argument(500, "updates during which the prototypes stay fixed "
                                            "(the authors' warm-up, with optim.warmup_steps)")
    same_crop_pairs: bool = argument(True, "the MI term averages all V x V crop pairs, (j, j) included")
    projection_nonlinear: bool = argument(False, "BN + ReLU inside the projection (the authors: "
                                          "Linear, Linear)")
    queue: int = argument(0, "embeddings of earlier batches' two large crops that join Sinkhorn "
                          "(SwAV's queue, for small per-step batches; 0: none)")
    queue_start_epoch: int = argument(1, "first epoch (from 0) whose Sinkhorn uses the queue")
    sinkhorn_relaxation: float = argument(1.0, "1: every prototype gets an equal share of the batch; "
                                          "r < 1 relaxes that into a KL penalty (unbalanced transport, "
                                          "as P2OT does); 0: no constraint")

    def validate(self) -> None:
        """ArgumentError naming the first argument out of range."""
        for name in ("same_crop_pairs", "projection_nonlinear"):
            value = getattr(self, name)
            require(isinstance(value, bool), "IMCSwAV", name, value, "must be true or false")
        for name in ("prototypes", "projection_hidden", "projection_dim", "classifier_hidden"):
            require(getattr(self, name) >= 2, "IMCSwAV", name, getattr(self, name), "must be >= 2")
        for name in ("temperature", "epsilon", "entropy_weight", "logit_bound"):
            require(getattr(self, name) > 0, "IMCSwAV", name, getattr(self, name), "must be > 0")
        require(self.sinkhorn_iterations >= 1, "IMCSwAV", "sinkhorn_iterations", self.sinkhorn_iterations,
                "must be >= 1")
        for name in ("logit_penalty", "freeze_prototypes_steps", "queue", "queue_start_epoch"):
            require(getattr(self, name) >= 0, "IMCSwAV", name, getattr(self, name), "must be >= 0")
        require(0 <= self.sinkhorn_relaxation <= 1, "IMCSwAV", "sinkhorn_relaxation",
                self.sinkhorn_relaxation, "must be in [0, 1]")


def swav_loss(codes: list[torch.Tensor], scores: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """Swapped prediction: mean over code crops i and other crops t of CE(q_i, softmax(u_t / tau)).

    codes: (B, P) Sinkhorn codes of the first len(codes) crops; scores: (B, P) per crop.
    """
    terms = []
    for i, q in enumerate(codes):
        for t, u in enumerate(scores):
            if t != i:
                terms.append(-(q * F.log_softmax(wide(u) / temperature, dim=-1)).sum(-1).mean())
    return torch.stack(terms).mean()


def mi_from_joint(joint: torch.Tensor, entropy_weight: float) -> torch.Tensor:
    """H(Y|U) - b H(Y) for unnormalised joints (..., K, P); returns (...)."""
    return weighted_information(joint / joint.sum(dim=(-2, -1), keepdim=True), entropy_weight, 1.0)


def imc_mi_loss(p_y: torch.Tensor, p_u: torch.Tensor, entropy_weight: float = 4.0) -> torch.Tensor:
    """IMC's MI term for one crop pair: p_y (B, K) classifier, p_u (B, P) prototype probabilities.

    With P_yu = p_y^T p_u / sum, L = H(Y|U) - b H(Y) (= -I(Y;U) - (b-1) H(Y)),
    the joint taken over the global batch.
    """
    return mi_from_joint(dist.all_reduce_sum(wide(p_y).t() @ wide(p_u)), entropy_weight)


def crop_pair_joints(p_y: torch.Tensor, p_u: torch.Tensor) -> torch.Tensor:
    """sum over the global batch of p_y[j, i]^T p_u[t, i] for every crop pair (j, t): (V, b, K)
    and (V, b, P) -> (V, V, K, P). Under a process group every rank needs all V^2 K P sums: they
    are summed over ranks when that is the smaller message, else every rank gathers the V B
    (K + P) probabilities of the global batch B and sums them itself (at K = P = 1000, V = 6 and
    B = 256: 6 MB a rank instead of 144 MB, for twice the local product at 2 workers)."""
    views, local, k = p_y.shape
    if views * local * dist.world_size() * (k + p_u.shape[-1]) >= views * views * k * p_u.shape[-1]:
        return dist.all_reduce_sum(torch.einsum("jbk,tbp->jtkp", p_y, p_u))
    return torch.einsum("jbk,tbp->jtkp", dist.gather_shared(p_y, dim=1), dist.gather_shared(p_u, dim=1))


class IMCSwAV(ObjectiveModule):
    """Projection + `prototypes` trained by SwAV; a `clusters`-way classifier trained by MI on
    detached features.

    SwAV: codes by `sinkhorn_iterations` Sinkhorn steps at `epsilon`, swapped prediction at
    `temperature`. MI: H(Y|U) - entropy_weight * H(Y) per (classifier crop, prototype crop)
    pair, averaged over all V x V pairs, the same crop's included (`same_crop_pairs`), plus
    logit_penalty * the mean excess of |logits| over `logit_bound`. As the authors' code, the
    projection is Linear -> Linear (`projection_nonlinear` puts BN + ReLU between them) and
    the prototypes are frozen for the first `freeze_prototypes_steps` updates. The defaults
    are the paper's."""

    def __init__(self, feature_dim: int, clusters: int, arguments: IMCSwAVArguments | None = None, *,
                 prior: str = "uniform", **overrides: object) -> None:
        super().__init__()
        require_sizes("IMCSwAV", feature_dim, clusters)
        args = settle(IMCSwAVArguments, arguments, overrides)
        self.temperature, self.epsilon, self.sinkhorn_iterations = (args.temperature, args.epsilon,
                                                                    args.sinkhorn_iterations)
        self.entropy_weight, self.same_crop_pairs = args.entropy_weight, args.same_crop_pairs
        self.logit_penalty, self.logit_bound = args.logit_penalty, args.logit_bound
        self.freeze_prototypes_steps = args.freeze_prototypes_steps
        self.projection = mlp([feature_dim, args.projection_hidden, args.projection_dim],
                              batch_norm=args.projection_nonlinear, relu=args.projection_nonlinear)
        self.prototypes = Prototypes(args.projection_dim, args.prototypes)
        self.classifier = mlp([feature_dim, args.classifier_hidden, args.classifier_hidden, clusters])
        self.prior = ClusterPrior(clusters, prior)
        self.queue_start_epoch, self.sinkhorn_relaxation = args.queue_start_epoch, args.sinkhorn_relaxation
        if args.queue:  # the newest last; the same on every rank (rows of the global batch)
            self.register_buffer("queue", torch.zeros(2, args.queue, args.projection_dim))

    def loss(self, features: list[torch.Tensor], step: int = 0, epoch: int = 0) -> ObjectiveResult:
        embeddings = [F.normalize(wide(self.projection(f)), dim=-1) for f in features]
        scores = [self.prototypes(e) for e in embeddings]
        large = torch.stack([u.detach() for u in scores[:2]])  # both large crops in one problem
        codes = list(sinkhorn(large, self.epsilon, self.sinkhorn_iterations,
                              queued=self._queued_scores(epoch),
                              relaxation=self.sinkhorn_relaxation).unbind(0))
        self._enqueue(torch.stack([e.detach() for e in embeddings[:2]]))
        swav = swav_loss(codes, scores, self.temperature)

        # The MI term trains only the classifier: its input and the prototype side are detached.
        logits = wide(torch.stack([self.classifier(f.detach()) for f in features]))  # (V, B, K)
        p_y = logits.softmax(-1)
        p_u = torch.stack([(u.detach() / self.temperature).softmax(-1) for u in scores])
        joints = crop_pair_joints(p_y, p_u)  # (V, V, K, P)
        marginals = joints.sum(-1) / joints.sum((-2, -1)).unsqueeze(-1)  # the classifier's, (V, V, K)
        sizes = self.prior.correction(marginals)  # zeros if uniform: prior.py
        per_pair = mi_from_joint(joints, self.entropy_weight) + self.entropy_weight * sizes  # (V, V)
        if self.same_crop_pairs:
            mi = per_pair.mean()
        else:
            mi = per_pair[~torch.eye(len(features), dtype=torch.bool, device=per_pair.device)].mean()
        penalty = self.logit_penalty * logit_penalty(logits, self.logit_bound)
        loss = swav + mi + penalty
        logs = {"swav": swav.detach(), "mi": mi.detach(), "logit_penalty": penalty.detach()}
        return ObjectiveResult(loss, logs, mi.detach().reshape(1))

    @torch.no_grad()
    def _queued_scores(self, epoch: int) -> torch.Tensor | None:
        """The queue's scores under the current prototypes, from queue_start_epoch on (rows
        not yet filled hold zeros: a score of 0 with every prototype)."""
        if not hasattr(self, "queue") or epoch < self.queue_start_epoch:
            return None
        return self.prototypes(self.queue)

    @torch.no_grad()
    def _enqueue(self, embeddings: torch.Tensor) -> None:
        """The global batch's large-crop embeddings (2, b, D per rank) join the queue's end; the
        oldest leave. A skipped step puts the queue back, with every other buffer."""
        if not hasattr(self, "queue"):
            return
        newest = torch.cat(list(dist.all_gather_stack(embeddings.to(self.queue))), dim=1)  # rank order
        self.queue.copy_(torch.cat([self.queue, newest], dim=1)[:, -self.queue.shape[1]:])

    def on_after_backward(self, step: int) -> None:
        if step < self.freeze_prototypes_steps:
            self.prototypes.weight.grad = None  # frozen during warm-up, as in SwAV

    def on_step_end(self, applied: torch.Tensor) -> None:
        self.prototypes.normalize_(applied)

    def cluster_probs(self, features: torch.Tensor) -> torch.Tensor:
        return self.prior.assigned(wide(self.classifier(features)).unsqueeze(0)).softmax(-1)

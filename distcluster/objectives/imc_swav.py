"""IMC-SwAV (Ntelemis et al., arXiv 2103.07368): SwAV self-labelling + MI(classifier; prototypes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distcluster import distributed as dist
from distcluster.models import Prototypes, mlp
from distcluster.objectives.base import (
    EPS,
    ObjectiveModule,
    ObjectiveResult,
    entropy,
    logit_penalty,
    require,
    require_sizes,
    wide,
)
from distcluster.objectives.sinkhorn import sinkhorn


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
    joint = joint / joint.sum(dim=(-2, -1), keepdim=True)
    p_u = joint.sum(dim=-2, keepdim=True)  # (..., 1, P)
    p_y = joint.sum(dim=-1)  # (..., K)
    cond = -(joint * (joint.clamp_min(EPS).log() - p_u.clamp_min(EPS).log())).sum(dim=(-2, -1))
    return cond - entropy_weight * entropy(p_y)


def imc_mi_loss(p_y: torch.Tensor, p_u: torch.Tensor, entropy_weight: float = 4.0) -> torch.Tensor:
    """IMC's MI term for one crop pair: p_y (B, K) classifier, p_u (B, P) prototype probabilities.

    With P_yu = p_y^T p_u / sum, L = H(Y|U) - b H(Y) (= -I(Y;U) - (b-1) H(Y)),
    the joint taken over the global batch.
    """
    return mi_from_joint(dist.all_reduce_sum(wide(p_y).t() @ wide(p_u)), entropy_weight)


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

    def __init__(self, feature_dim: int, clusters: int, *, prototypes: int = 1000,
                 projection_hidden: int = 512, projection_dim: int = 128, classifier_hidden: int = 1024,
                 temperature: float = 0.1, epsilon: float = 0.05, sinkhorn_iterations: int = 3,
                 entropy_weight: float = 4.0, logit_penalty: float = 0.01, logit_bound: float = 5.0,
                 freeze_prototypes_steps: int = 500, same_crop_pairs: bool = True,
                 projection_nonlinear: bool = False) -> None:
        super().__init__()
        require_sizes("IMCSwAV", feature_dim, clusters)
        self.check_arguments(prototypes, projection_hidden, projection_dim, classifier_hidden, temperature,
                             epsilon, sinkhorn_iterations, entropy_weight, logit_penalty, logit_bound,
                             freeze_prototypes_steps, same_crop_pairs, projection_nonlinear)
        self.temperature, self.epsilon, self.sinkhorn_iterations = temperature, epsilon, sinkhorn_iterations
        self.entropy_weight, self.same_crop_pairs = entropy_weight, same_crop_pairs
        self.logit_penalty, self.logit_bound = logit_penalty, logit_bound
        self.freeze_prototypes_steps = freeze_prototypes_steps
        self.projection = mlp([feature_dim, projection_hidden, projection_dim],
                              batch_norm=projection_nonlinear, relu=projection_nonlinear)
        self.prototypes = Prototypes(projection_dim, prototypes)
        self.classifier = mlp([feature_dim, classifier_hidden, classifier_hidden, clusters])

    @staticmethod
    def check_arguments(prototypes: int, projection_hidden: int, projection_dim: int, classifier_hidden: int,
                        temperature: float, epsilon: float, sinkhorn_iterations: int, entropy_weight: float,
                        logit_penalty: float, logit_bound: float, freeze_prototypes_steps: int,
                        same_crop_pairs: bool = True, projection_nonlinear: bool = False) -> None:
        """ArgumentError naming the first argument out of range."""
        switches = {"same_crop_pairs": same_crop_pairs, "projection_nonlinear": projection_nonlinear}
        for name, value in switches.items():
            require(isinstance(value, bool), "IMCSwAV", name, value, "must be true or false")
        sizes = {"prototypes": prototypes, "projection_hidden": projection_hidden,
                 "projection_dim": projection_dim, "classifier_hidden": classifier_hidden}
        for name, value in sizes.items():
            require(value >= 2, "IMCSwAV", name, value, "must be >= 2")
        positive = {"temperature": temperature, "epsilon": epsilon, "entropy_weight": entropy_weight,
                    "logit_bound": logit_bound}
        for name, value in positive.items():
            require(value > 0, "IMCSwAV", name, value, "must be > 0")
        require(sinkhorn_iterations >= 1, "IMCSwAV", "sinkhorn_iterations", sinkhorn_iterations,
                "must be >= 1")
        require(logit_penalty >= 0, "IMCSwAV", "logit_penalty", logit_penalty, "must be >= 0")
        require(freeze_prototypes_steps >= 0, "IMCSwAV", "freeze_prototypes_steps", freeze_prototypes_steps,
                "must be >= 0")

    def loss(self, features: list[torch.Tensor], step: int = 0, epoch: int = 0) -> ObjectiveResult:
        scores = [self.prototypes(F.normalize(wide(self.projection(f)), dim=-1)) for f in features]
        large = torch.stack([u.detach() for u in scores[:2]])  # both large crops in one problem
        codes = list(sinkhorn(large, self.epsilon, self.sinkhorn_iterations).unbind(0))
        swav = swav_loss(codes, scores, self.temperature)

        # The MI term trains only the classifier: its input and the prototype side are detached.
        logits = wide(torch.stack([self.classifier(f.detach()) for f in features]))  # (V, B, K)
        p_y = logits.softmax(-1)
        p_u = torch.stack([(u.detach() / self.temperature).softmax(-1) for u in scores])
        joints = dist.all_reduce_sum(torch.einsum("jbk,tbp->jtkp", p_y, p_u))  # (V, V, K, P)
        per_pair = mi_from_joint(joints, self.entropy_weight)  # (V, V)
        if self.same_crop_pairs:
            mi = per_pair.mean()
        else:
            mi = per_pair[~torch.eye(len(features), dtype=torch.bool, device=per_pair.device)].mean()
        penalty = self.logit_penalty * logit_penalty(logits, self.logit_bound)
        loss = swav + mi + penalty
        logs = {"swav": swav.detach(), "mi": mi.detach(), "logit_penalty": penalty.detach()}
        return ObjectiveResult(loss, logs, mi.detach().reshape(1))

    def on_step_start(self) -> None:
        self.prototypes.normalize_()

    def on_after_backward(self, step: int) -> None:
        if step < self.freeze_prototypes_steps:
            self.prototypes.weight.grad = None  # frozen during warm-up, as in SwAV

    def cluster_probs(self, features: torch.Tensor) -> torch.Tensor:
        return wide(self.classifier(features)).softmax(-1).unsqueeze(0)

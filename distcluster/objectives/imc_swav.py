"""IMC-SwAV (Ntelemis et al., arXiv 2103.07368): SwAV self-labelling + MI(classifier; prototypes)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distcluster import distributed as dist
from distcluster.config import IMCSwAVConfig
from distcluster.models import Prototypes, mlp
from distcluster.objectives.base import EPS, ObjectiveResult, entropy, logit_penalty, wide
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


class IMCSwAV(nn.Module):
    """Projection + prototypes trained by SwAV; a K-way classifier trained by MI on detached features.

    As the authors' code: the projection is Linear -> Linear (`projection_nonlinear` puts
    BN + ReLU between them), the MI term averages every (classifier crop, prototype crop)
    pair, the same crop's pairs included (`same_crop_pairs`), and the prototypes are
    frozen for the first `freeze_prototypes_steps` updates."""

    def __init__(self, feature_dim: int, clusters: int, cfg: IMCSwAVConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.projection = mlp([feature_dim, cfg.projection_hidden, cfg.projection_dim],
                              batch_norm=cfg.projection_nonlinear, relu=cfg.projection_nonlinear)
        self.prototypes = Prototypes(cfg.projection_dim, cfg.prototypes)
        hidden = cfg.classifier_hidden
        self.classifier = mlp([feature_dim, hidden, hidden, clusters])

    def loss(self, features: list[torch.Tensor], step: int = 0, epoch: int = 0) -> ObjectiveResult:
        scores = [self.prototypes(F.normalize(wide(self.projection(f)), dim=-1)) for f in features]
        large = torch.stack([u.detach() for u in scores[:2]])  # both large crops in one problem
        codes = list(sinkhorn(large, self.cfg.epsilon, self.cfg.sinkhorn_iterations).unbind(0))
        swav = swav_loss(codes, scores, self.cfg.temperature)

        # The MI term trains only the classifier: its input and the prototype side are detached.
        logits = wide(torch.stack([self.classifier(f.detach()) for f in features]))  # (V, B, K)
        p_y = logits.softmax(-1)
        p_u = torch.stack([(u.detach() / self.cfg.temperature).softmax(-1) for u in scores])
        joints = dist.all_reduce_sum(torch.einsum("jbk,tbp->jtkp", p_y, p_u))  # (V, V, K, P)
        per_pair = mi_from_joint(joints, self.cfg.entropy_weight)  # (V, V)
        if self.cfg.same_crop_pairs:
            mi = per_pair.mean()
        else:
            mi = per_pair[~torch.eye(len(features), dtype=torch.bool, device=per_pair.device)].mean()
        penalty = self.cfg.logit_penalty * logit_penalty(logits, self.cfg.logit_bound)
        loss = swav + mi + penalty
        logs = {"swav": swav.detach(), "mi": mi.detach(), "logit_penalty": penalty.detach()}
        return ObjectiveResult(loss, logs, mi.detach().reshape(1))

    def on_step_start(self) -> None:
        self.prototypes.normalize_()

    def on_after_backward(self, step: int) -> None:
        if step < self.cfg.freeze_prototypes_steps:
            self.prototypes.weight.grad = None  # frozen during warm-up, as in SwAV

    def cluster_probs(self, features: torch.Tensor) -> torch.Tensor:
        return wide(self.classifier(features)).softmax(-1).unsqueeze(0)

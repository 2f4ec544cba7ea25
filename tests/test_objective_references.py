"""Whole objectives against references written from the authors' code, in float64.

Each reference follows the official training step of its paper's code term by term
(xu-ji/IIC cluster_sobel_twohead.py + IID_losses.py; foiv0s/imc-swav-pub model.py,
costs.py, utils.py; clarken92/InfoMaxClustering crlc.py + online_criteria.py), using
only the parameters of distcluster's modules, never their forward code. Losses and the
gradients of every parameter and input feature must agree.
"""

import sys
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from distcluster.core.objectives import CRLC, IIC, CRLCArguments, IICArguments, IMCSwAV, IMCSwAVArguments

BATCH, FEATURES, CLUSTERS = 12, 10, 4


def features(views: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(BATCH, FEATURES, generator=gen, dtype=torch.float64).requires_grad_()
            for _ in range(views)]


def compare(objective, reference, feats: list[torch.Tensor], **loss_args) -> None:
    """Loss and gradients (parameters and features) of objective.loss and reference agree."""
    params = dict(objective.named_parameters())
    ours = objective.loss(feats, **loss_args).loss
    our_grads = torch.autograd.grad(ours, [*params.values(), *feats], allow_unused=True)
    theirs = reference(objective, feats)
    their_grads = torch.autograd.grad(theirs, [*params.values(), *feats], allow_unused=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
    names = [*params, *(f"feature {i}" for i in range(len(feats)))]
    for name, mine, ref in zip(names, our_grads, their_grads, strict=True):
        mine = torch.zeros_like(ref) if mine is None and ref is not None else mine
        ref = torch.zeros_like(mine) if ref is None and mine is not None else ref
        if mine is not None:
            torch.testing.assert_close(mine, ref, rtol=1e-8, atol=1e-11, msg=f"gradient of {name}")


# ------------------------------------------------------------------------------ IIC
def official_iid_loss(x_out: torch.Tensor, x_tf_out: torch.Tensor, lamb: float) -> torch.Tensor:
    """IID_losses.IID_loss: joint of the pairs, symmetrised, marginals taken before the clamp."""
    eps = sys.float_info.epsilon
    k = x_out.shape[1]
    p = (x_out.unsqueeze(2) * x_tf_out.unsqueeze(1)).sum(0)
    p = (p + p.t()) / 2 / ((p + p.t()) / 2).sum()
    p_i = p.sum(1).view(k, 1).expand(k, k)
    p_j = p.sum(0).view(1, k).expand(k, k)
    p, p_i, p_j = (torch.where(t < eps, eps, t) for t in (p, p_i, p_j))
    return -(p * (p.log() - lamb * p_j.log() - lamb * p_i.log())).sum()


def official_iic_step(head, feats: list[torch.Tensor], lamb: float) -> torch.Tensor:
    """One batch of cluster_sobel_twohead.py for one head: the anchor's outputs repeated once
    per transformed view, against the transformed views, one IID loss per sub-head, averaged."""
    all_imgs = torch.cat([feats[0]] * (len(feats) - 1))
    all_imgs_tf = torch.cat(feats[1:])
    weight, bias = head.out.weight, head.out.bias  # (S, D, K), (S, 1, K)
    losses = [official_iid_loss((all_imgs @ weight[i] + bias[i]).softmax(-1),
                                (all_imgs_tf @ weight[i] + bias[i]).softmax(-1), lamb)
              for i in range(weight.shape[0])]
    return sum(losses) / len(losses)


@pytest.mark.parametrize(("epoch", "trained"), [(0, "over"), (1, "main"), (2, "main"), (3, "over")])
def test_iic_matches_the_authors_step_and_head_schedule(epoch, trained):
    cfg = IICArguments(overclusters=7, subheads=3, lamb=1.3)  # defaults: anchor pairing, heads (1, 2)
    torch.manual_seed(0)
    objective = IIC(FEATURES, CLUSTERS, **asdict(cfg)).double()
    compare(objective, lambda obj, f: official_iic_step(getattr(obj, trained), f, cfg.lamb),
            features(4), epoch=epoch)


# ------------------------------------------------------------------------- IMC-SwAV
def official_sinkhorn(q: torch.Tensor, iterations: int) -> torch.Tensor:
    """utils.sinkhorn on Q (P, B) = exp(u / eps)^T, including its sign-flipping column target."""
    q = q / q.sum()
    r = torch.ones(q.shape[0], dtype=q.dtype) / q.shape[0]
    c = torch.ones(q.shape[1], dtype=q.dtype) / (-1 * q.shape[1])
    for _ in range(iterations):
        q = q * (r / q.sum(1)).unsqueeze(1)
        q = q * (c / q.sum(0)).unsqueeze(0)
    return (q / q.sum(0, keepdim=True)).t()


def official_mi(y: torch.Tensor, u: torch.Tensor, b: float = 4, a: float = 1e-2):
    """costs.mi: H(Y|U) - b H(Y) of the joint, and the logit regulariser."""
    lgt_reg = a * torch.relu(torch.abs(y) - 5.0).sum(-1).mean()
    py, pu = torch.softmax(y, -1), torch.softmax(u, -1)
    p_yu = py.T @ pu
    p_yu = p_yu / p_yu.sum()
    p_u = p_yu.sum(0).view(1, -1)
    p_y = p_yu.sum(1).view(-1, 1)
    h_uy = (p_yu * (p_u.log() - p_yu.log())).sum()
    hy = b * (p_yu * p_y.log()).sum()
    return h_uy + hy, lgt_reg


def official_classifier(layers, z: torch.Tensor) -> torch.Tensor:
    """graphs.Classifier: Linear -> BN -> ReLU -> Linear -> BN -> ReLU -> Linear on detached z."""
    first, bn1, _, second, bn2, _, last = layers
    x = z.detach()
    for linear, bn in ((first, bn1), (second, bn2)):
        x = F.linear(x, linear.weight, linear.bias)
        x = F.relu(F.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=bn.eps))
    return F.linear(x, last.weight, last.bias)


def official_imc_step(obj: IMCSwAV, feats: list[torch.Tensor], cfg: IMCSwAVArguments,
                      large_crops: int = 2) -> torch.Tensor:
    """model.Model._encode + forward and the loss of task_train._train."""
    tau, eps = cfg.temperature, cfg.epsilon
    first, second = obj.projection  # graphs.Projection: Linear(D, D') -> Linear(D', 128), nothing between
    prototypes = obj.prototypes.weight  # put back on the sphere in place before the step, as the authors do
    u = [F.normalize(F.linear(F.linear(z, first.weight, first.bias), second.weight, second.bias),
                     dim=1) @ prototypes.t() for z in feats]
    swav = []
    for i in range(large_crops):
        q = official_sinkhorn(torch.exp(u[i].detach() / eps).t(), 3)
        swav += [-(q * torch.log(torch.softmax(px / tau, -1).clamp(1e-17, 1.0))).sum(-1).mean()
                 for p, px in enumerate(u) if p != i]
    ys = [official_classifier(obj.classifier, z) for z in feats]
    mi, lgt = zip(*[official_mi(y, ux.detach() / tau) for y in ys for ux in u], strict=True)
    return sum(swav) / len(swav) + torch.stack(mi).mean() + torch.stack(lgt).mean()


def test_imc_swav_matches_the_authors_step():
    torch.manual_seed(0)
    cfg = IMCSwAVArguments(prototypes=9, projection_hidden=FEATURES, projection_dim=6, classifier_hidden=16)
    objective = IMCSwAV(FEATURES, CLUSTERS, **asdict(cfg)).double()
    objective.prototypes.normalize_()  # on the sphere (after .double(), as the authors keep them)
    compare(objective, lambda obj, f: official_imc_step(obj, f, cfg), features(6, seed=1))


# ----------------------------------------------------------------------------- CRLC
def official_nt_xent(z_1: torch.Tensor, z_2: torch.Tensor, temperature: float) -> torch.Tensor:
    """online_criteria.ConInstContrast_v2 on normalised z: every other view in the denominator."""
    z = torch.cat([z_1, z_2])
    sim = z @ z.t() / temperature
    sim = sim - sim.max(dim=1, keepdim=True).values.detach()
    b = len(z_1)
    positive = torch.cat([torch.diag(sim, b), torch.diag(sim, -b)])
    mask = ~torch.eye(2 * b, dtype=torch.bool)
    return (-positive + (sim.exp() * mask).sum(1).log()).mean()


def official_cat_contrast(p_1: torch.Tensor, p_2: torch.Tensor) -> torch.Tensor:
    """online_criteria.CatInstContrast (log_dot_prod critic): the positive first, then the
    2B - 2 others, cross-entropy with label 0."""
    p = torch.cat([p_1, p_2])
    sim = (p @ p.t()).log()
    b = len(p_1)
    positive = torch.cat([torch.diag(sim, b), torch.diag(sim, -b)]).view(-1, 1)
    mask = torch.ones(2 * b, 2 * b, dtype=torch.bool).fill_diagonal_(False)
    for i in range(b):
        mask[i, b + i] = mask[b + i, i] = False
    logits = torch.cat([positive, sim[mask].view(2 * b, -1)], dim=1)
    return F.cross_entropy(logits, torch.zeros(2 * b, dtype=torch.long))


def official_crlc_subhead(ly_1: torch.Tensor, ly_2: torch.Tensor, cfg: CRLCArguments) -> torch.Tensor:
    """CRLC._loss_of_1_subhead with contrast_y 1, entropy 2, logit clamps 0.01 (run_train_cifar10)."""
    k, alpha, bound, zero = ly_1.shape[-1], cfg.smoothing, cfg.logit_bound, torch.zeros((), dtype=ly_1.dtype)
    py_1, py_2 = ly_1.softmax(-1), ly_2.softmax(-1)
    contrast_y = official_cat_contrast((1 - alpha) * py_1 + alpha / k, (1 - alpha) * py_2 + alpha / k)
    avg_1, avg_2 = py_1.mean(0), py_2.mean(0)
    entropy = -0.5 * ((avg_1 * avg_1.log()).sum(0) + (avg_2 * avg_2.log()).sum(0))
    lower = 0.5 * sum((ly * torch.min(ly.detach() + bound, zero)).sum(1).mean(0) for ly in (ly_1, ly_2))
    upper = 0.5 * sum((ly * torch.max(ly.detach() - bound, zero)).sum(1).mean(0) for ly in (ly_1, ly_2))
    return contrast_y + cfg.entropy_weight * (-entropy) + cfg.logit_penalty * (lower + upper)


def official_crlc_step(obj: CRLC, feats: list[torch.Tensor], cfg: CRLCArguments) -> torch.Tensor:
    """CRLC._cluster_loss: 10 x NT-Xent of the projections + the mean of the sub-head losses."""
    first, _, second = obj.representation  # Linear -> ReLU -> Linear
    z = [F.normalize(F.linear(F.relu(F.linear(f, first.weight, first.bias)), second.weight, second.bias),
                     dim=-1) for f in feats[:2]]
    hidden, out = obj.cluster.hidden, obj.cluster.out
    width = hidden.out_features // cfg.subheads

    def logits(f: torch.Tensor, s: int) -> torch.Tensor:
        rows = slice(s * width, (s + 1) * width)
        h = F.relu(F.linear(f, hidden.weight[rows], hidden.bias[rows]))
        return h @ out.weight[s] + out.bias[s]

    subheads = [official_crlc_subhead(logits(feats[0], s), logits(feats[1], s), cfg)
                for s in range(cfg.subheads)]
    return cfg.feature_weight * official_nt_xent(*z, cfg.temperature) + sum(subheads) / len(subheads)


def test_crlc_matches_the_authors_step():
    torch.manual_seed(0)
    args = CRLCArguments(subheads=3, hidden=8, projection_dim=5, logit_bound=1.5)  # the clamps act
    objective = CRLC(FEATURES, CLUSTERS, args).double()
    feats = [f * 4 for f in features(2, seed=2)]
    assert (objective.cluster(feats[0]).abs() > args.logit_bound).any()  # the clamp terms are in play
    compare(objective, lambda obj, f: official_crlc_step(obj, f, args), feats)

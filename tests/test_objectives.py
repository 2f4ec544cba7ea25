"""Known answers and from-the-equation references for the objectives."""

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distcluster import config
from distcluster.common.errors import ConfigError
from distcluster.core.objectives import (
    CRLC,
    IIC,
    CRLCArguments,
    IICArguments,
    IMCSwAV,
    IMCSwAVArguments,
    Objective,
    crlc_cluster_nce,
    iic_loss,
    imc_mi_loss,
    nt_xent,
    sinkhorn,
)
from distcluster.core.objectives.crlc import view_pairs


def reference_iic(z_a: np.ndarray, z_b: np.ndarray, lamb: float) -> float:
    """IIC eq. (3) written out with loops, straight from methods.md."""
    batch, k = z_a.shape
    joint = np.zeros((k, k))
    for i in range(batch):
        joint += np.outer(z_a[i], z_b[i]) / batch
    joint = np.maximum((joint + joint.T) / 2, 1e-8)
    rows, cols = joint.sum(1), joint.sum(0)
    return -sum(joint[c, d] * (math.log(joint[c, d]) - lamb * math.log(rows[c])
                               - lamb * math.log(cols[d])) for c in range(k) for d in range(k))


@pytest.mark.parametrize("k", [2, 5, 10])
def test_iic_of_identical_balanced_one_hot_pairs_is_minus_log_k(k):
    z = torch.eye(k).repeat(3, 1)
    # The K^2 - K empty cells are clamped at 1e-8 before the log, worth < 1e-4 in total.
    assert iic_loss(z, z).item() == pytest.approx(-math.log(k), abs=1e-4)


@pytest.mark.parametrize("lamb", [1.0, 1.5])
def test_iic_matches_reference_on_random_inputs(lamb):
    gen = torch.Generator().manual_seed(0)
    z_a = torch.randn(37, 6, generator=gen).softmax(-1)
    z_b = torch.randn(37, 6, generator=gen).softmax(-1)
    expected = reference_iic(z_a.double().numpy(), z_b.double().numpy(), lamb)
    assert iic_loss(z_a, z_b, lamb).item() == pytest.approx(expected, rel=1e-4)


def test_iic_of_independent_uniform_outputs_is_zero_at_lambda_one():
    z = torch.full((8, 4), 0.25)
    assert iic_loss(z, z).item() == pytest.approx(0.0, abs=1e-6)


def test_sinkhorn_rows_sum_to_one_and_prototypes_share_the_batch():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(64, 8, generator=gen)
    codes = sinkhorn(scores, epsilon=0.5, iterations=200)
    torch.testing.assert_close(codes.sum(1), torch.ones(64))
    torch.testing.assert_close(codes.sum(0), torch.full((8,), 64 / 8), atol=1e-3, rtol=1e-3)


def test_a_queue_joins_sinkhorn_once_and_keeps_small_batches_balanced_and_sharp():
    """8 samples, 32 prototypes: alone, equipartition spreads each code over 4 prototypes; with
    256 queued rows the prototypes share 264 samples, the batch's codes are sharper, and the
    queue and batch together stay balanced."""
    gen = torch.Generator().manual_seed(4)
    batch, queued = torch.randn(8, 32, generator=gen) * 3, torch.randn(256, 32, generator=gen) * 3
    alone = sinkhorn(batch, epsilon=0.5, iterations=300)
    with_queue = sinkhorn(batch, epsilon=0.5, iterations=300, queued=queued)
    torch.testing.assert_close(with_queue.sum(1), torch.ones(8))
    joint = sinkhorn(torch.cat([queued, batch]), epsilon=0.5, iterations=300)  # the same problem
    torch.testing.assert_close(with_queue, joint[256:])
    torch.testing.assert_close(joint.sum(0), torch.full((32,), 264 / 32), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(alone.sum(0), torch.full((32,), 8 / 32), atol=1e-3, rtol=1e-3)
    assert with_queue.max(1).values.mean() > alone.max(1).values.mean() + 0.1


def test_imc_swav_queue_keeps_the_latest_large_crop_embeddings_and_joins_from_its_epoch():
    torch.manual_seed(0)
    objective = IMCSwAV(12, 4, prototypes=16, projection_hidden=16, projection_dim=8, classifier_hidden=16,
                        queue=20, queue_start_epoch=1)
    older, newer = ([torch.randn(6, 12) for _ in range(3)] for _ in range(2))
    assert objective._queued_scores(epoch=0) is None  # not yet: the queue still fills
    objective.loss(older, epoch=0)
    objective.loss(newer, epoch=0)

    def embedded(features):
        return torch.stack([F.normalize(objective.projection(f), dim=-1) for f in features[:2]]).detach()

    torch.testing.assert_close(objective.queue[:, -6:], embedded(newer))  # the newest last
    torch.testing.assert_close(objective.queue[:, -12:-6], embedded(older))
    assert objective.queue[:, :8].abs().sum() == 0  # rows not yet filled
    assert objective._queued_scores(epoch=1).shape == (2, 20, 16)
    assert "queue" in objective.state_dict()  # in checkpoints: a resumed run has the same queue
    assert "queue" not in IMCSwAV(12, 4, prototypes=16).state_dict()  # and older models load as they were


def test_sinkhorn_solves_stacked_problems_as_it_solves_each_alone():
    gen = torch.Generator().manual_seed(1)
    first, second = torch.randn(32, 6, generator=gen), torch.randn(32, 6, generator=gen) * 3
    together = sinkhorn(torch.stack([first, second]))
    torch.testing.assert_close(together[0], sinkhorn(first))
    torch.testing.assert_close(together[1], sinkhorn(second))


def test_sinkhorn_has_no_gradient_and_handles_large_scores():
    scores = (torch.randn(16, 4) * 100).requires_grad_()
    codes = sinkhorn(scores)
    assert not codes.requires_grad
    assert torch.isfinite(codes).all()


def test_imc_mi_of_perfectly_matched_balanced_assignments():
    k = 4
    one_hot = torch.eye(k).repeat(5, 1)
    # Y determined by U (H(Y|U) = 0), H(Y) = log K: loss = -b log K.
    assert imc_mi_loss(one_hot, one_hot, 4.0).item() == pytest.approx(-4 * math.log(k), abs=1e-5)


def test_imc_mi_matches_reference_on_random_inputs():
    gen = torch.Generator().manual_seed(3)
    p_y = torch.randn(20, 3, generator=gen).softmax(-1).double()
    p_u = torch.randn(20, 7, generator=gen).softmax(-1).double()
    joint = (p_y.T @ p_u).numpy()
    joint /= joint.sum()
    marg_u, marg_y = joint.sum(0), joint.sum(1)
    h_y_given_u = -sum(joint[y, u] * math.log(joint[y, u] / marg_u[u])
                       for y in range(3) for u in range(7))
    h_y = -sum(p * math.log(p) for p in marg_y)
    assert imc_mi_loss(p_y, p_u, 4.0).item() == pytest.approx(h_y_given_u - 4 * h_y, rel=1e-5)


def reference_two_view_nce(a: np.ndarray, b: np.ndarray, critic) -> float:
    views = np.concatenate([a, b])
    n = len(a)
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        logits = [critic(views[i], views[j]) for j in range(2 * n) if j != i]
        kept = [j for j in range(2 * n) if j != i]
        log_norm = np.log(np.sum(np.exp(logits)))
        total += -(logits[kept.index(positive)] - log_norm)
    return total / (2 * n)


def test_nt_xent_matches_reference():
    gen = torch.Generator().manual_seed(1)
    a = torch.nn.functional.normalize(torch.randn(6, 5, generator=gen), dim=1).double()
    b = torch.nn.functional.normalize(torch.randn(6, 5, generator=gen), dim=1).double()
    expected = reference_two_view_nce(a.numpy(), b.numpy(), lambda x, y: x @ y / 0.1)
    assert nt_xent(a, b, 0.1).item() == pytest.approx(expected, rel=1e-5)


def test_crlc_cluster_nce_matches_reference_log_dot_critic():
    gen = torch.Generator().manual_seed(2)
    p_a = torch.randn(5, 4, generator=gen).softmax(-1).double()
    p_b = torch.randn(5, 4, generator=gen).softmax(-1).double()
    expected = reference_two_view_nce(p_a.numpy(), p_b.numpy(), lambda x, y: np.log(x @ y))
    assert crlc_cluster_nce(p_a, p_b).item() == pytest.approx(expected, rel=1e-5)


def test_crlc_cluster_nce_handles_subhead_axis():
    gen = torch.Generator().manual_seed(4)
    p_a = torch.randn(3, 5, 4, generator=gen).softmax(-1)
    p_b = torch.randn(3, 5, 4, generator=gen).softmax(-1)
    stacked = crlc_cluster_nce(p_a, p_b)
    assert stacked.shape == (3,)
    for s in range(3):
        assert stacked[s].item() == pytest.approx(crlc_cluster_nce(p_a[s], p_b[s]).item(), rel=1e-6)


def test_crlc_on_three_crops_is_the_mean_of_its_two_crop_losses_over_the_three_pairs():
    """Multi-crop CRLC contrasts crop 2 with crops 0 and 1 and averages the balance over the views:
    with three crops every view is in two of the three pairs, so the loss is exactly the mean of
    the paper's two-crop loss over the pairs."""
    torch.manual_seed(0)
    crlc = CRLC(8, 4, subheads=2, hidden=16, projection_dim=6).double()
    views = [torch.randn(10, 8, dtype=torch.float64) for _ in range(3)]
    pairs = [(0, 1), (0, 2), (1, 2)]
    two_crop = [crlc.loss([views[i], views[j]]).loss for i, j in pairs]
    assert crlc.loss(views).loss.item() == pytest.approx(torch.stack(two_crop).mean().item(), rel=1e-9)
    assert view_pairs(2) == ([0], [1])
    assert view_pairs(4) == ([0, 0, 1, 0, 1], [1, 2, 2, 3, 3])


OBJECTIVE_SECTIONS = [(IIC, "iic", IICArguments), (IMCSwAV, "imc_swav", IMCSwAVArguments),
                      (CRLC, "crlc", CRLCArguments)]


@pytest.mark.parametrize(("objective", "section", "arguments"), OBJECTIVE_SECTIONS)
def test_each_config_section_is_its_objectives_own_arguments(objective, section, arguments):
    """One definition: the config section is the objective's typed arguments, so a value set in a
    recipe is the value the objective is built with."""
    cfg = config.from_dict({"objective": section, section: {"subheads": 3} if section != "imc_swav"
                            else {"prototypes": 7}})
    assert type(getattr(cfg, section)) is arguments
    built = objective(8, 3, getattr(cfg, section))
    assert isinstance(built, Objective)
    assert objective(8, 3, **dataclasses.asdict(getattr(cfg, section))).state_dict().keys() == \
        built.state_dict().keys()


def test_an_unknown_constructor_argument_is_refused():
    with pytest.raises(TypeError, match="wobble"):
        IIC(8, 3, wobble=1)


@pytest.mark.parametrize(("build", "argument"), [
    (lambda: IIC(8, 3, lamb=0), "lamb"),
    (lambda: IIC(8, 3, head_epochs=(0, 2)), "head_epochs"),
    (lambda: IMCSwAV(8, 3, epsilon=-1.0), "epsilon"),
    (lambda: IMCSwAV(8, 1), "clusters"),
    (lambda: CRLC(8, 3, smoothing=1.0), "smoothing"),
    (lambda: CRLC(0, 3), "feature_dim"),
])
def test_a_bad_constructor_argument_is_a_value_error_naming_it(build, argument):
    with pytest.raises(ValueError, match=rf": {argument} must"):
        build()


def test_a_bad_config_value_names_the_config_key_through_the_objectives_own_rule():
    with pytest.raises(ConfigError, match=r"'crlc\.smoothing': must be in \[0, 1\)"):
        config.from_dict({"crlc": {"smoothing": 1.5}}).validate()


# ------------------------------------------------------------------ the cluster-size prior
def test_the_uniform_prior_adds_nothing_and_keeps_no_state():
    from distcluster.core.objectives.prior import ClusterPrior

    marginals = torch.tensor([[0.7, 0.2, 0.1]])
    assert torch.equal(ClusterPrior(3, "uniform").correction(marginals), torch.zeros(1))
    assert not list(ClusterPrior(3, "uniform").buffers())  # its checkpoints are as before
    torch.testing.assert_close(ClusterPrior(3, "estimated").correction(marginals), torch.zeros(1))
    assert ClusterPrior(3, "uniform").profile_metrics() == {}  # nothing to log


def test_the_logged_profile_metrics_have_known_values():
    from distcluster.core.objectives.prior import ClusterPrior

    prior = ClusterPrior(4, "estimated")
    assert prior.profile_metrics()["prior/departure"] == 0  # equal sizes until the first estimate
    prior.target.copy_(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    assert prior.profile_metrics() == pytest.approx(
        {"prior/departure": 0.2, "prior/largest_share": 0.4, "prior/smallest_share": 0.1})


def test_the_estimated_prior_pulls_the_sorted_sizes_towards_the_profile_whichever_cluster_holds_which():
    """-H(m) + correction(m) = KL(m sorted || t) - log K: the same for any order of the clusters,
    and no pull when the sizes are the profile's."""
    from distcluster.core.objectives.prior import ClusterPrior

    prior = ClusterPrior(3, "estimated")
    prior.target.copy_(torch.tensor([0.5, 0.3, 0.2]))
    m = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.3, 0.6]])  # the same sizes, clusters in another order
    kl = (m[0] * (m[0] / prior.target).log()).sum()
    torch.testing.assert_close((m * m.log()).sum(-1) + prior.correction(m), (kl - math.log(3)).expand(2))
    at_profile = torch.tensor([0.2, 0.5, 0.3], requires_grad=True)
    loss = (at_profile * at_profile.log()).sum() + prior.correction(at_profile)
    (gradient,) = torch.autograd.grad(loss, at_profile)
    torch.testing.assert_close(gradient, torch.full_like(gradient, 1 - math.log(3)))  # equal: no pull


def test_features_that_are_not_finite_leave_the_profile_as_it_was():
    from distcluster.core.objectives.prior import ClusterPrior

    prior = ClusterPrior(3, "estimated")
    prior.target.copy_(torch.tensor([0.5, 0.3, 0.2]))
    features = torch.randn(30, 4)
    features[7, 2] = float("nan")
    prior.update(features, weight=0.75, generator=torch.Generator().manual_seed(0))
    assert prior.target.tolist() == pytest.approx([0.5, 0.3, 0.2])


def test_calibrated_assignments_give_each_cluster_its_soft_share_of_the_images():
    """Two sub-heads whose argmax favours a cluster more than their probabilities do (the first
    head: 0.68 of the images for 0.56 of the mass): after `calibrate`, argmax of each head's
    assigned logits gives every cluster that head's soft share."""
    from distcluster.core.objectives.prior import ClusterPrior

    gen = torch.Generator().manual_seed(0)
    groups = torch.multinomial(torch.tensor([0.5, 0.3, 0.2]), 4000, replacement=True, generator=gen)
    shared = 0.8 * torch.randn(4000, 3, generator=gen) + F.one_hot(groups, 3)
    logits = torch.stack([shared + torch.tensor([0.8, 0.0, -0.5]), shared + torch.tensor([-0.6, 0.0, 1.0])])
    soft = logits.softmax(-1).mean(1)  # (S, K): different for the two heads

    def hard(x):
        return torch.stack([torch.bincount(h.argmax(-1), minlength=3) / 4000 for h in x])

    assert (hard(logits) - soft).abs().max() > 0.1
    prior = ClusterPrior(3, "calibrated", heads=2)
    prior.calibrate(prior.assigned(logits).softmax(-1))
    torch.testing.assert_close(hard(prior.assigned(logits)), soft, atol=0.005, rtol=0)
    prior.calibrate(prior.assigned(logits).softmax(-1))  # again, from calibrated probabilities
    torch.testing.assert_close(hard(prior.assigned(logits)), soft, atol=0.005, rtol=0)
    for other in ("uniform", "estimated"):  # they assign by the heads' own argmax
        assert torch.equal(ClusterPrior(3, other).assigned(logits), logits)
    assert set(ClusterPrior(3, "estimated").state_dict()) == {"target"}  # its checkpoints are as before


@pytest.mark.parametrize(("objective", "subheads"), [(IIC, 3), (IMCSwAV, 1), (CRLC, 3)])
def test_every_objective_assigns_through_the_calibrated_shift_of_each_sub_head(objective, subheads):
    torch.manual_seed(0)
    built = objective(12, 4, prior="calibrated", **({} if subheads == 1 else {"subheads": subheads})).eval()
    features = torch.randn(32, 12)
    unshifted = built.cluster_probs(features)
    shift = torch.arange(subheads * 4, dtype=torch.float32).view(subheads, 4) / 5
    built.prior.assignment_shift.copy_(shift)
    torch.testing.assert_close(built.cluster_probs(features), (unshifted.log() + shift[:, None]).softmax(-1))


def blobs(sizes: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Well separated groups of the given sizes in 16 dimensions: (features, group of each)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.eye(16)[:len(sizes)] * 5
    groups = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return centres[groups] + 0.3 * torch.randn(len(groups), 16, generator=gen), groups


def test_spherical_kmeans_finds_groups_of_very_different_sizes():
    from distcluster.core.metrics import cluster_scores
    from distcluster.core.objectives.prior import spherical_kmeans

    features, groups = blobs([300, 120, 50, 30])
    found = spherical_kmeans(features, 4, torch.Generator().manual_seed(1))
    assert cluster_scores(groups.numpy(), found.numpy())["acc"] == 1.0


def test_an_update_mixes_the_kmeans_sizes_largest_first_with_equal_sizes():
    from distcluster.core.objectives.prior import ClusterPrior, estimate_weight

    features, _ = blobs([50, 300, 30, 120])
    prior = ClusterPrior(4, "estimated")
    prior.update(features, 0.75, torch.Generator().manual_seed(0))
    torch.testing.assert_close(prior.target, 0.25 / 4 + 0.75 * torch.tensor([300, 120, 50, 30]) / 500)
    assert estimate_weight(0, 40) == 0 and estimate_weight(5, 40) == 0.375 and estimate_weight(30, 40) == 0.75


def test_a_relaxed_sinkhorn_lets_the_prototypes_share_unequally_and_keeps_each_sample_whole():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(64, 8, generator=gen) + torch.linspace(0, 2, 8)  # the last prototypes favoured
    exact = sinkhorn(scores, epsilon=0.5, iterations=200)
    torch.testing.assert_close(sinkhorn(scores, epsilon=0.5, iterations=200, relaxation=1.0), exact)
    free = sinkhorn(scores, epsilon=0.5, iterations=200, relaxation=0.0)
    torch.testing.assert_close(free, (scores / 0.5).softmax(-1))  # no constraint on the prototypes
    relaxed = sinkhorn(scores, epsilon=0.5, iterations=200, relaxation=0.5)
    for codes in (free, relaxed):
        torch.testing.assert_close(codes.sum(1), torch.ones(64))

    def spread(codes):  # how far the prototypes' totals are from equal shares
        return float((codes.sum(0) - 64 / 8).abs().sum())

    assert spread(exact) < 0.1 < spread(relaxed) < spread(free)


@pytest.mark.parametrize("objective", [IIC, IMCSwAV, CRLC])
def test_an_unknown_prior_is_refused_and_config_refuses_it_in_one_line(objective):
    with pytest.raises(ValueError, match="prior must be one of uniform, estimated, calibrated"):
        objective(12, 4, prior="balanced")
    with pytest.raises(ConfigError, match="'prior'.*uniform, estimated"):
        config.from_dict({"prior": "balanced"}).validate()

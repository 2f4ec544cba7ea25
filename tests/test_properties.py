"""Properties of the losses, Sinkhorn and the information measures, for inputs hypothesis draws
(bounded draws, so that `make test-fast` stays quick): a loss is invariant to permuting the
batch and to relabelling the clusters, Sinkhorn's codes keep their marginals for any scores
and temperature and follow a permutation, an independent joint holds no information, and
gradients stay finite at extreme logits."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distcluster.core.information import weighted_information
from distcluster.core.metrics import mutual_information
from distcluster.core.objectives import crlc_cluster_nce, iic_loss, imc_mi_loss, nt_xent, sinkhorn

BOUNDED = settings(max_examples=25, deadline=None)


@st.composite
def problems(draw):
    """(probabilities of two views (B, K), a batch permutation, a cluster permutation)."""
    batch, k = draw(st.integers(2, 12)), draw(st.integers(2, 6))
    seed, scale = draw(st.integers(0, 2**31 - 1)), draw(st.floats(0.1, 20.0))
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, batch, k, generator=gen, dtype=torch.float64) * scale
    return (*logits.softmax(-1).unbind(0), torch.randperm(batch, generator=gen),
            torch.randperm(k, generator=gen))


@BOUNDED
@given(problems())
def test_iic_is_invariant_to_the_batch_order_and_to_relabelling_clusters(problem):
    z_a, z_b, order, relabel = problem
    loss = iic_loss(z_a, z_b, lamb=1.5)
    assert torch.allclose(iic_loss(z_a[order], z_b[order], lamb=1.5), loss, atol=1e-10)
    assert torch.allclose(iic_loss(z_a[:, relabel], z_b[:, relabel], lamb=1.5), loss, atol=1e-10)


@BOUNDED
@given(problems())
def test_imc_mi_is_invariant_to_the_batch_order_and_to_relabelling_either_side(problem):
    p_y, p_u, order, relabel = problem
    loss = imc_mi_loss(p_y, p_u, entropy_weight=4.0)
    assert torch.allclose(imc_mi_loss(p_y[order], p_u[order]), loss, atol=1e-10)
    assert torch.allclose(imc_mi_loss(p_y[:, relabel], p_u), loss, atol=1e-10)
    assert torch.allclose(imc_mi_loss(p_y, p_u[:, relabel]), loss, atol=1e-10)


@BOUNDED
@given(problems())
def test_crlc_terms_are_invariant_to_the_batch_order_and_to_relabelling_clusters(problem):
    p_a, p_b, order, relabel = problem
    loss = crlc_cluster_nce(p_a, p_b)
    assert torch.allclose(crlc_cluster_nce(p_a[order], p_b[order]), loss, atol=1e-10)
    assert torch.allclose(crlc_cluster_nce(p_a[:, relabel], p_b[:, relabel]), loss, atol=1e-10)
    r_a, r_b = torch.nn.functional.normalize(p_a, dim=-1), torch.nn.functional.normalize(p_b, dim=-1)
    assert torch.allclose(nt_xent(r_a[order], r_b[order]), nt_xent(r_a, r_b), atol=1e-10)


@st.composite
def score_tables(draw):
    batch, prototypes = draw(st.integers(2, 24)), draw(st.integers(2, 12))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scores = torch.rand(batch, prototypes, generator=gen, dtype=torch.float64) * 2 - 1  # cosines
    return scores, draw(st.floats(0.05, 2.0)), torch.randperm(batch, generator=gen), \
        torch.randperm(prototypes, generator=gen)


def prototype_error(codes: torch.Tensor) -> float:
    """How far the prototypes' shares are from B/P each (L1)."""
    batch, prototypes = codes.shape
    return float((codes.sum(0) - batch / prototypes).abs().sum())


@BOUNDED
@given(score_tables())
def test_sinkhorn_codes_keep_their_marginals_and_follow_permutations(table):
    scores, epsilon, order, relabel = table
    batch, prototypes = scores.shape
    codes = {n: sinkhorn(scores, epsilon=epsilon, iterations=n) for n in (3, 30, 300)}
    for each in codes.values():
        assert torch.isfinite(each).all() and (each >= 0).all()
        assert torch.allclose(each.sum(1), torch.ones(batch, dtype=each.dtype), atol=1e-9)  # one per sample
    # each prototype's share approaches B/P, never moving away as iterations add up (Sinkhorn's
    # marginal error does not grow), and is reached closely where the scores are not too sharp
    errors = [prototype_error(codes[n]) for n in (3, 30, 300)]
    assert errors[0] + 1e-9 >= errors[1] and errors[1] + 1e-9 >= errors[2], errors
    if epsilon >= 0.3:  # scores span 2 units: exp(2 / 0.3) at most between any two
        assert errors[2] < 1e-3 * batch, errors
    assert torch.allclose(sinkhorn(scores[order], epsilon, 30), codes[30][order], atol=1e-9)
    assert torch.allclose(sinkhorn(scores[:, relabel], epsilon, 30), codes[30][:, relabel], atol=1e-9)


@BOUNDED
@given(st.integers(2, 8), st.integers(2, 8), st.integers(0, 2**31 - 1), st.floats(0.5, 4.0))
def test_an_independent_joint_holds_no_information(rows, cols, seed, weight):
    gen = torch.Generator().manual_seed(seed)
    p = torch.rand(rows, generator=gen, dtype=torch.float64) + 0.01
    q = torch.rand(cols, generator=gen, dtype=torch.float64) + 0.01
    p, q = p / p.sum(), q / q.sum()
    joint = torch.outer(p, q)
    assert abs(weighted_information(joint, 1.0, 1.0).item()) < 1e-12  # -I = 0
    # with weights, only the marginals' entropies are left: -(a - 1) H(p) - (b - 1) H(q)
    entropy = lambda x: -(x * x.log()).sum()  # noqa: E731
    expected = -(weight - 1) * entropy(p) - (weight - 1) * entropy(q)
    assert torch.allclose(weighted_information(joint, weight, weight), expected, atol=1e-12)
    assert abs(mutual_information(joint.numpy())) < 1e-12


@BOUNDED
@given(st.integers(0, 2**31 - 1), st.sampled_from([1e2, 1e4, 1e6]))
def test_gradients_stay_finite_at_extreme_logits(seed, scale):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(3, 16, 5, generator=gen) * scale).requires_grad_()
    losses = [lambda z: iic_loss(z[0], z[1]), lambda z: imc_mi_loss(z[0], z[2]),
              lambda z: crlc_cluster_nce(z[0], z[1])]
    for loss_of in losses:
        loss = loss_of(logits.softmax(-1))  # one-hot up to rounding: zeros and ones
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_mutual_information_of_a_known_joint():
    joint = np.array([[0.5, 0.0], [0.0, 0.5]])  # two equally likely, fully shared bits
    assert np.isclose(mutual_information(joint), np.log(2))

"""N workers compute exactly what one process on the global batch would."""

import pytest
import torch
import torch.multiprocessing as mp
from distributed_cases import BATCH, SKIP_MODES, run_cases, worker

WORLD = 2


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gloo")
    mp.spawn(worker, args=(WORLD, str(folder / "init"), str(folder)), nprocs=WORLD, join=True)
    ranks = [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    return run_cases(0, 1), ranks


OBJECTIVES = ("iic", "imc_swav", "crlc", "imc_swav_gathered", "iic_estimated", "imc_swav_estimated",
              "crlc_estimated")
OBJECTIVE_CASES = [f"{name}{mode}" for name in OBJECTIVES for mode in ("", "_train")]


@pytest.mark.parametrize("objective", OBJECTIVE_CASES)
def test_objective_loss_and_gradients_match_single_process(both, objective):
    single, ranks = both
    for rank in ranks:
        assert set(rank[objective]) == set(single[objective])
        for name, expected in single[objective].items():
            torch.testing.assert_close(rank[objective][name], expected, atol=1e-5, rtol=1e-4,
                                       msg=f"{objective}: {name} differs")


def test_iic_loss_gradient_wrt_inputs_matches(both):
    single, ranks = both
    for rank in ranks:
        torch.testing.assert_close(rank["iic_loss"]["loss"], single["iic_loss"]["loss"])
        torch.testing.assert_close(rank["iic_loss"]["x"], single["iic_loss"]["x"])


@pytest.mark.parametrize("case", ["sinkhorn", "sinkhorn_queued", "sinkhorn_relaxed"])
def test_sinkhorn_codes_match_single_process(both, case):
    single, ranks = both
    half = BATCH // WORLD
    for r, rank in enumerate(ranks):
        for way in ("codes", "codes_reduced"):
            torch.testing.assert_close(rank[case][way],
                                       single[case]["codes"][..., r * half:(r + 1) * half, :])


@pytest.mark.parametrize("mode", sorted(SKIP_MODES))
def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(both, mode):
    _, ranks = both
    for rank in ranks:
        assert rank[mode]["flags"].tolist() == [1.0, 0.0, 1.0]
        # the weights are those of the two good steps alone, as if the bad one never was
        torch.testing.assert_close(rank[mode]["poisoned"], rank[mode]["clean"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ranks[0][mode]["poisoned"], ranks[1][mode]["poisoned"], rtol=0, atol=0)


def test_training_with_global_batchnorm_equals_one_process_on_the_global_batch(both):
    """model.sync_batchnorm=true: three whole steps in train mode, weights and running statistics."""
    single, ranks = both
    for rank in ranks:
        for name, expected in single["training_global_bn"].items():
            torch.testing.assert_close(rank["training_global_bn"][name], expected, atol=1e-5, rtol=1e-4,
                                       msg=f"{name} differs")


def test_per_worker_batchnorm_is_not_world_size_invariant(both):
    """The documented exception (sync_batchnorm false, the CPU default): each worker normalises
    with its own half of the batch, so the workers drift apart from one process (and their
    running statistics from each other) while DDP keeps their weights equal to each other."""
    single, ranks = both
    first, second = (rank["training_worker_bn"]["weights"] for rank in ranks)
    assert not torch.allclose(first, single["training_worker_bn"]["weights"], atol=1e-4)
    torch.testing.assert_close(first, second)

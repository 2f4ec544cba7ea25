"""Evaluation shared by every worker (issue 33): each rank assigns a contiguous run of whole
batches, and rank 0's gathered assignments and scores are those of one process."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st
from recorder import Recorder

from distcluster import config
from distcluster.data.arrays import load_digits_source, load_source
from distcluster.data.augment import MultiCrop
from distcluster.engine.build import WorkerContext, build_model
from distcluster.engine.evaluation import (
    EVAL_BATCH,
    Assignments,
    assign,
    assign_shared,
    clustering_scores,
    final_assignments,
    shard_range,
)
from distcluster.engine.loop import train_loop


@given(count=st.integers(0, 5000), world=st.integers(1, 9), batch=st.integers(1, 700))
def test_the_ranks_shares_are_whole_batches_that_cover_every_image_once(count, world, batch):
    ranges = [shard_range(count, world, rank, batch) for rank in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == count
    for (_, stop), (start, _) in zip(ranges, ranges[1:], strict=False):
        assert stop == start  # contiguous, in rank order
    assert all(start % batch == 0 and start <= stop for start, stop in ranges)
    batches = [-(-(stop - start) // batch) for start, stop in ranges]
    assert max(batches) - min(batches) <= 1  # as even as whole batches allow


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A model trained for 2 epochs on 512 digits, whose last report kept its assignments."""
    cfg = config.from_dict({**config.load_recipe("digits-imc-swav"), "epochs": 2, "max_samples": 512,
                            "batch_size": 128, "precision": "fp32",
                            "model": {"backbone": "small_cnn", "width": 8}})
    recorder = Recorder()
    train_loop(cfg, load_source("digits", 512), WorkerContext(), recorder, log=lambda _: None)
    path = tmp_path_factory.mktemp("trained") / "state.pt"
    torch.save(recorder.reports[-1].checkpoint(), path)
    return path


def model_and_data(path: Path):
    """The trained model, every digit (more than one evaluation batch) and its augmentation."""
    state = torch.load(path, weights_only=True)
    cfg = config.from_dict(state["config"])
    source = load_digits_source()
    model = build_model(cfg, source.channels)
    model.load_state_dict(state["model"])
    return model, source, MultiCrop(cfg.augment, state["input"]["mean"], state["input"]["std"])


def _evaluate_on_two_ranks(rank: int, init_file: str, folder: str, trained: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        model, source, augment = model_and_data(Path(trained))
        found = assign_shared(model, source, augment, torch.device("cpu"), head=0)
        torch.save({"found": None if found is None else found.as_tensors()}, Path(folder) / f"rank{rank}.pt")
        torch.distributed.barrier()  # neither rank tears the group down while the other still uses it
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_workers_assign_every_image_as_one_process_does(tmp_path, checkpoint):
    torch.set_num_threads(1)
    model, source, augment = model_and_data(checkpoint)
    assert len(source) > EVAL_BATCH  # two ranks, each with work of its own
    alone = assign(model, source, augment, torch.device("cpu"), head=0)
    mp.spawn(_evaluate_on_two_ranks, args=(str(tmp_path / "init"), str(tmp_path), str(checkpoint)),
             nprocs=2, join=True)
    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True)["found"] for r in range(2)]
    assert saved[1] is None  # the others hand their share to rank 0
    shared = Assignments.from_tensors(saved[0])
    assert np.array_equal(shared.clusters, alone.clusters)
    assert np.array_equal(shared.perturbed, alone.perturbed)
    assert np.array_equal(shared.confidence, alone.confidence)
    assert len(np.unique(alone.clusters)) > 1  # a model whose assignments say something
    scores, expected = clustering_scores(shared, source.labels), clustering_scores(alone, source.labels)
    assert scores == pytest.approx(expected, rel=1e-9)
    sizes = [np.bincount(a.clusters, minlength=a.k) for a in (shared, alone)]
    assert np.array_equal(*sizes)


def test_an_image_is_perturbed_alike_in_whichever_range_it_is_assigned(checkpoint):
    model, source, augment = model_and_data(checkpoint)
    whole = assign(model, source, augment, torch.device("cpu"), head=0, batch=256)
    part = assign(model, source, augment, torch.device("cpu"), head=0, start=512, stop=1024, batch=256)
    assert np.array_equal(part.perturbed, whole.perturbed[512:1024])
    assert np.array_equal(part.clusters, whole.clusters[512:1024])


def test_the_final_checkpoint_keeps_the_last_evaluations_assignments_and_scores(checkpoint):
    """The end of a run scores what the last epoch's evaluation found, without a pass over the data."""
    state = torch.load(checkpoint, weights_only=True)
    model, _, augment = model_and_data(checkpoint)
    source = load_source("digits", 512)
    kept = Assignments.from_tensors(state["assignments"])
    again = assign(model, source, augment, torch.device("cpu"), state["head"])
    assert np.array_equal(kept.clusters, again.clusters) and np.array_equal(kept.perturbed, again.perturbed)
    scores = clustering_scores(kept, source.labels)
    assert {k: state["history"][-1][f"eval/{k}"] for k in scores} == pytest.approx(scores)
    assert 0 < state["history"][-1]["train/serial_share"] < 1


def test_a_rank_whose_share_is_empty_assigns_nothing(checkpoint):
    """Fewer whole batches than ranks: some rank's share is empty."""
    model, source, augment = model_and_data(checkpoint)
    assert shard_range(len(source), 4, 0) == (0, 0)  # 2 batches of 1024 for 4 ranks
    empty = assign(model, source, augment, torch.device("cpu"), head=0, start=0, stop=0)
    assert len(empty.clusters) == len(empty.confidence) == len(empty.perturbed) == 0
    joined = Assignments.joined([assign(model, source, augment, torch.device("cpu"), 0), empty])
    assert len(joined.clusters) == len(source)


def test_a_checkpoint_without_kept_assignments_or_with_other_images_is_assigned_again(checkpoint):
    """An older version's final checkpoint, or one resumed onto other data: one pass instead."""
    state = torch.load(checkpoint, weights_only=True)
    source = load_source("digits", 512)
    kept = final_assignments(state, source)
    older = final_assignments({k: v for k, v in state.items() if k != "assignments"}, source)
    assert np.array_equal(kept.clusters, older.clusters) and np.array_equal(kept.perturbed, older.perturbed)
    other = final_assignments(state, load_source("digits", 300))
    assert len(other.clusters) == 300

"""Pieces of the training loop with known answers."""

import numpy as np
import pytest
import torch

from distcluster import config
from distcluster.common.errors import ConfigError
from distcluster.engine.build import WorkerContext, build_training_state
from distcluster.engine.step import learning_rate, set_learning_rate


def test_the_learning_rate_warms_up_linearly_per_update_as_imc_swavs_code():
    cfg = config.from_dict({**config.load_recipe("digits-imc-swav"),
                            "optim": {"lr": 0.01, "warmup_steps": 4}})
    state = build_training_state(cfg, 1, WorkerContext())
    seen = []
    for step in range(6):
        state.step = step
        set_learning_rate(state)
        seen.append([group["lr"] for group in state.optimizer.param_groups])
    # (step + 1) / 4 of the lr for the first 4 updates, then the lr itself, in every group
    assert seen == [[pytest.approx(lr)] * 2 for lr in [0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01]]
    assert state.lr == seen[-1][0]


def test_one_schedule_per_update_combines_epoch_warm_up_milestones_and_step_warm_up():
    optim = config.from_dict({"optim": {"lr": 1.0, "warmup_epochs": 2, "warmup_steps": 10,
                                        "milestones": [3, 5], "gamma": 0.1}}).optim
    at = {(epoch, step): learning_rate(optim, epoch, step, 10) for epoch, step in
          [(0, 0), (0, 4), (1, 9), (1, 20), (2, 30), (3, 40), (5, 50)]}
    assert at == pytest.approx({(0, 0): 0.5 * 0.1, (0, 4): 0.5 * 0.5, (1, 9): 1.0, (1, 20): 1.0,
                                (2, 30): 1.0, (3, 40): 0.1, (5, 50): 0.01})


def test_the_cosine_schedule_falls_from_the_lr_to_near_zero_over_the_epochs():
    optim = config.from_dict({"optim": {"lr": 2.0, "schedule": "cosine", "warmup_steps": 2}}).optim
    at = [learning_rate(optim, epoch, step, 4) for epoch, step in [(0, 0), (0, 5), (1, 9), (2, 12), (3, 20)]]
    # (1 + cos(pi e / 4)) / 2 of the lr in epoch e: 1, 0.854, 0.5, 0.146; halved at the first update
    assert at == pytest.approx([1.0, 2.0, 1.7071, 1.0, 0.2929], abs=1e-4)
    with pytest.raises(ConfigError, match="optim.milestones"):
        config.from_dict({"optim": {"schedule": "cosine", "milestones": [3]}}).validate()
    with pytest.raises(ConfigError, match="optim.schedule"):
        config.from_dict({"optim": {"schedule": "linear"}}).validate()


def test_steps_per_epoch_ends_each_epoch_after_that_many_steps():
    from recorder import Recorder

    from distcluster.data.arrays import load_source
    from distcluster.engine.loop import train_loop

    cfg = config.from_dict({**config.load_recipe("digits-imc-swav"), "epochs": 2, "max_samples": 512,
                            "batch_size": 128, "steps_per_epoch": 3, "eval_every": 0,
                            "model": {"backbone": "small_cnn", "width": 4}})
    recorder = Recorder()
    train_loop(cfg, load_source("digits", 512), WorkerContext(), recorder, log=lambda _: None)
    assert recorder.reports[-1].checkpoint()["step"] == 6  # 3 of the 4 batches, twice
    assert [r.evaluated for r in recorder.reports] == [False, True]
    with pytest.raises(ConfigError, match="steps_per_epoch"):
        config.from_dict({"steps_per_epoch": -1}).validate()


@pytest.mark.parametrize("prior", ["estimated", "calibrated"])
@pytest.mark.parametrize("objective", ["iic", "imc_swav", "crlc"])
def test_a_fitted_prior_sets_new_target_sizes_after_every_epoch(objective, prior):
    """After epoch e the profile is (1 - w) u + w * the k-means sizes, w ramping up (prior.py): it
    sums to 1, is sorted, keeps (1 - w) / K for each cluster, and is not the uniform one; under
    `calibrated` every sub-head has an assignment shift too."""
    from recorder import Recorder

    from distcluster.core.objectives.prior import estimate_weight
    from distcluster.data.arrays import load_source
    from distcluster.engine.loop import train_loop

    cfg = config.from_dict({**config.load_recipe(f"digits-{objective.replace('_', '-')}"), "epochs": 4,
                            "batch_size": 128, "steps_per_epoch": 2, "eval_every": 0, "prior": prior,
                            "model": {"backbone": "small_cnn", "width": 4}})
    recorder = Recorder()
    train_loop(cfg, load_source("digits", 512), WorkerContext(), recorder, log=lambda _: None)
    weights = recorder.reports[-1].checkpoint()["model"]
    target = weights["objective.prior.target"]
    floor = (1 - estimate_weight(4, 4)) / cfg.clusters
    assert float(target.sum()) == pytest.approx(1)
    assert torch.equal(target, target.sort(descending=True).values)
    assert target.min() >= floor - 1e-6 and (target - 1 / cfg.clusters).abs().max() > 0.01
    logged = recorder.epochs[-1]  # what the run logs of the profile (MLflow metrics)
    assert logged["prior/departure"] == pytest.approx(0.5 * float((target - 1 / cfg.clusters).abs().sum()))
    assert logged["prior/largest_share"] == float(target[0])
    assert logged["prior/smallest_share"] == float(target[-1])
    if prior == "calibrated":
        shift = weights["objective.prior.assignment_shift"]
        subheads = getattr(getattr(cfg, cfg.objective), "subheads", 1)
        assert shift.shape == (subheads, cfg.clusters)
        assert torch.isfinite(shift).all() and shift.abs().max() > 0
    else:
        assert "objective.prior.assignment_shift" not in weights


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_an_epoch_cut_short_stops_ffcvs_reading_thread(tmp_path):
    """steps_per_epoch on a .beton: each cut epoch's FFCV reader ends (without the close, every
    epoch left one running, holding its batches' memory)."""
    import time

    from ffcv.loader.epoch_iterator import EpochIterator
    from recorder import Recorder

    from distcluster.data.beton_writer import write_beton
    from distcluster.data.ffcv_io import BetonSource
    from distcluster.data.images import ArrayCollection, digits_arrays
    from distcluster.engine.loop import train_loop

    images, labels = digits_arrays()
    write_beton(ArrayCollection(images[:1024], labels[:1024], "digits", "npz"), tmp_path / "d.beton",
                workers=1, progress=False)
    cfg = config.from_dict({**config.load_recipe("digits-imc-swav"), "epochs": 3, "batch_size": 64,
                            "steps_per_epoch": 2, "eval_every": 0, "data": str(tmp_path / "d.beton"),
                            "model": {"backbone": "small_cnn", "width": 4}})
    readers = []
    start = EpochIterator.start
    EpochIterator.start = lambda self: (readers.append(self), start(self))[1]
    try:
        train_loop(cfg, BetonSource(tmp_path / "d.beton"), WorkerContext(), Recorder(), log=lambda _: None)
    finally:
        EpochIterator.start = start
    assert len(readers) >= 3  # one per training epoch, and the statistics' and evaluation's
    deadline = time.monotonic() + 120  # a bound for failure only: a closed reader ends within a second
    for reader in readers:
        reader.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not any(reader.is_alive() for reader in readers)


def test_a_calibrated_models_export_assigns_as_its_training_did(tmp_path):
    """prior: calibrated shifts the assignments; the exported model (safetensors + JSON, what
    predict and the MLflow model load) carries the shift and gives the run's own clusters."""
    from recorder import Recorder

    from distcluster.data.arrays import load_source
    from distcluster.engine.exported import assignment_table, export_model, load_model
    from distcluster.engine.loop import train_loop

    cfg = config.from_dict({**config.load_recipe("digits-imc-swav"), "epochs": 2, "max_samples": 512,
                            "batch_size": 128, "precision": "fp32", "prior": "calibrated",
                            "model": {"backbone": "small_cnn", "width": 8}})
    source = load_source("digits", 512)
    recorder = Recorder()
    train_loop(cfg, source, WorkerContext(), recorder, log=lambda _: None)
    state = recorder.reports[-1].checkpoint()
    assert state["model"]["objective.prior.assignment_shift"].abs().max() > 0
    for name in ("model", "unshifted"):
        (tmp_path / name).mkdir()
    export_model(state, tmp_path / "model")
    images = source.images.permute(0, 2, 3, 1).numpy()
    table = assignment_table(load_model(tmp_path / "model"), images)
    assert np.array_equal(table["cluster"].to_numpy(), state["assignments"]["clusters"].numpy())
    state["model"]["objective.prior.assignment_shift"].zero_()  # the heads' own argmax differs
    export_model(state, tmp_path / "unshifted")
    unshifted = assignment_table(load_model(tmp_path / "unshifted"), images)
    assert (unshifted["cluster"] != table["cluster"]).sum() > 10

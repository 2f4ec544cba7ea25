"""Pieces of the training loop with known answers."""

import pytest

from distcluster import config
from distcluster.engine.build import WorkerContext, build_training_state
from distcluster.engine.step import warm_up_learning_rate


def test_the_learning_rate_warms_up_linearly_per_update_as_imc_swavs_code():
    cfg = config.from_dict({**config.load_recipe("digits-imc-swav"),
                            "optim": {"lr": 0.01, "warmup_steps": 4}})
    state = build_training_state(cfg, 1, WorkerContext())
    seen = []
    for step in range(6):
        state.step = step
        warm_up_learning_rate(state)
        seen.append(state.optimizer.param_groups[0]["lr"])
    # (step + 1) / 4 of the lr for the first 4 updates, then the schedule's own
    assert seen == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01])

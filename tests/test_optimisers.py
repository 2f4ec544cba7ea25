"""Every optimiser on every step path survives a skipped first step and parameters whose
gradient comes later (IMC-SwAV's frozen prototypes), and a skipped step leaves no trace but
the step count: the run equals one that started at that count."""

import pytest
import torch
from torch import nn

from distcluster import config
from distcluster.engine.build import WorkerContext, build_training_state
from distcluster.engine.step import train_step

PATHS = {"plain": {"fused_optimizer": False, "check_every": 1},  # the host skips the update
         "deferred": {"fused_optimizer": True, "check_every": 2}}  # the fused kernel skips it


def small_imc_swav(optimizer: str, path: str) -> config.Config:
    return config.from_dict({
        **config.load_recipe("digits-imc-swav"), "precision": "fp32", "max_bad_steps": 5,
        "model": {"backbone": "small_cnn", "width": 4},
        "optim": {"name": optimizer, "lr": 0.01, "warmup_steps": 0},
        "imc_swav": {"prototypes": 8, "projection_hidden": 8, "projection_dim": 4, "classifier_hidden": 8,
                     "freeze_prototypes_steps": 2},  # no prototype gradient in the first 2 steps
        "speed": {"channels_last": False, "compile": False, **PATHS[path]}})


def crops_for(cfg: config.Config, batch: int = 16) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randn(g.count * batch, 1, g.size, g.size, generator=gen) for g in cfg.augment.crops]


def trained(cfg: config.Config, steps: list[bool],
            start_step: int = 0) -> tuple[list[float], nn.Module, dict]:
    """Finite flags, model and optimiser state after `steps` (True: the loss is made NaN)."""
    state = build_training_state(cfg, 1, WorkerContext())
    state.step = start_step
    crops = crops_for(cfg)
    flags = [float(train_step(state, crops, 16, inject_nan=bad)[1]) for bad in steps]
    return flags, state.model, state.optimizer.state_dict()["state"]


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd"])
def test_a_skipped_first_step_leaves_nothing_but_the_step_count(optimizer, path):
    cfg = small_imc_swav(optimizer, path)
    flags, model, moments = trained(cfg, [True, False, False])  # the prototypes train from step 2
    _, reference, reference_moments = trained(cfg, [False, False], start_step=1)
    assert flags == [0.0, 1.0, 1.0]
    for (name, got), expected in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)
    assert moments.keys() == reference_moments.keys()
    for index, values in moments.items():
        for key, value in values.items():
            torch.testing.assert_close(value, reference_moments[index][key], rtol=1e-5, atol=1e-6,
                                       msg=f"{optimizer} {path}: state {index} {key}")


SMALL_HEADS = {"imc_swav": {"prototypes": 8, "projection_hidden": 8, "projection_dim": 4,
                            "classifier_hidden": 8, "projection_nonlinear": True,
                            "freeze_prototypes_steps": 1, "queue": 40, "queue_start_epoch": 0},
               "iic": {"overclusters": 12, "subheads": 2},
               "crlc": {"subheads": 2, "hidden": 8, "projection_dim": 4}}


def small(objective: str, path: str) -> config.Config:
    return config.from_dict({
        **config.load_recipe(f"digits-{objective.replace('_', '-')}"), "precision": "fp32",
        "max_bad_steps": 5,
        "model": {"backbone": "small_cnn", "width": 4}, "optim": {"name": "sgd", "lr": 0.05},
        objective: SMALL_HEADS[objective],
        "speed": {"channels_last": False, "compile": False, **PATHS[path]}})


def everything(state) -> dict[str, torch.Tensor]:
    """Copies of every tensor of the model (weights, BatchNorm statistics, prototypes) and the
    optimiser (moments, step counts, hyperparameters but the scheduled lr)."""
    tensors = {f"model.{k}": v.clone() for k, v in state.model.state_dict().items()}
    saved = state.optimizer.state_dict()
    for index, values in saved["state"].items():
        tensors.update({f"optimizer.{index}.{k}": torch.as_tensor(v).clone()
                        for k, v in values.items()})
    for index, group in enumerate(saved["param_groups"]):
        numbers = {k: v for k, v in group.items() if k not in ("lr", "params") and isinstance(v, int | float)}
        tensors.update({f"group.{index}.{k}": torch.tensor(float(v)) for k, v in numbers.items()})
    return tensors


@pytest.mark.parametrize("poison", ["loss", "input"])
@pytest.mark.parametrize("bad_step", [0, 3])
@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("objective", sorted(SMALL_HEADS))
def test_a_skipped_step_leaves_the_state_bit_for_bit_as_it_was(objective, path, bad_step, poison):
    """A NaN at step k, in the loss or in an image (NaN activations then reach every BatchNorm
    statistic in the forward pass): everything the state holds is exactly what it was before."""
    cfg = small(objective, path)
    state = build_training_state(cfg, 1, WorkerContext())
    crops = crops_for(cfg)
    for _ in range(bad_step):
        assert float(train_step(state, crops, 16)[1]) == 1.0
    before = everything(state)
    bad_crops = [c.clone() for c in crops]
    if poison == "input":
        bad_crops[0][0, 0, 0, 0] = float("nan")
    assert float(train_step(state, bad_crops, 16, inject_nan=poison == "loss")[1]) == 0.0
    after = everything(state)
    assert after.keys() == before.keys()
    changed = [name for name in before if not torch.equal(after[name], before[name])]
    assert changed == []
    assert state.step == bad_step + 1  # the one counter that moves on (and the lr it schedules)
    assert float(train_step(state, crops, 16)[1]) == 1.0  # and training goes on
    assert all(torch.isfinite(v).all() for v in everything(state).values())

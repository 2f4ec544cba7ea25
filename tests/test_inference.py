"""Loading exported models: what older distcluster versions wrote still loads."""

import json

import torch

from distcluster import config
from distcluster.engine.build import build_model
from distcluster.engine.exported import LEGACY_WEIGHTS_FILE, MODEL_CONFIG_FILE, load_model


def write_old_model(folder, cfg: config.Config, written: dict) -> dict[str, torch.Tensor]:
    """A model folder as an older version wrote it: weights.pt and config.json with `written`."""
    weights = build_model(cfg, 1).state_dict()
    torch.save(weights, folder / LEGACY_WEIGHTS_FILE)
    (folder / MODEL_CONFIG_FILE).write_text(json.dumps({
        "config": written, "head": 0, "epoch": 1,
        "input": {"channels": 1, "size": [8, 8], "mean": [0.5], "std": [0.25]}}))
    return weights


def assert_same_weights(loaded, weights: dict[str, torch.Tensor]) -> None:
    for name, tensor in weights.items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name


def test_an_imc_swav_model_from_before_the_linear_projection_still_loads(tmp_path):
    """Older configs had no imc_swav.projection_nonlinear: their projection had BN + ReLU."""
    values = config.load_recipe("digits-imc-swav")
    old = config.from_dict({**values, "imc_swav": {**values["imc_swav"], "projection_nonlinear": True}})
    written = old.to_dict()
    del written["imc_swav"]["projection_nonlinear"]  # as an older version wrote it
    weights = write_old_model(tmp_path, old, written)
    assert_same_weights(load_model(tmp_path), weights)


def test_a_crlc_model_from_before_projection_dim_still_loads(tmp_path):
    """Older configs called crlc.projection_dim crlc.feature_dim."""
    values = config.load_recipe("digits-crlc")
    cfg = config.from_dict({**values, "crlc": {**values["crlc"], "projection_dim": 24}})
    written = cfg.to_dict()
    written["crlc"]["feature_dim"] = written["crlc"].pop("projection_dim")
    weights = write_old_model(tmp_path, cfg, written)
    loaded = load_model(tmp_path)
    assert_same_weights(loaded, weights)
    assert loaded.model.objective.representation[-1].out_features == 24

"""Loading exported models: what older distcluster versions wrote still loads."""

import json

import torch

from distcluster import config
from distcluster.checkpoint import MODEL_CONFIG_FILE, WEIGHTS_FILE
from distcluster.inference import load_model
from distcluster.loop import build_model


def test_an_imc_swav_model_from_before_the_linear_projection_still_loads(tmp_path):
    """Older configs had no imc_swav.projection_nonlinear: their projection had BN + ReLU."""
    values = config.load_recipe("digits-imc-swav")
    old = config.from_dict({**values, "imc_swav": {**values["imc_swav"], "projection_nonlinear": True}})
    model = build_model(old, 1)
    written = old.to_dict()
    del written["imc_swav"]["projection_nonlinear"]  # as an older version wrote it
    torch.save(model.state_dict(), tmp_path / WEIGHTS_FILE)
    (tmp_path / MODEL_CONFIG_FILE).write_text(json.dumps({
        "config": written, "head": 0, "epoch": 1,
        "input": {"channels": 1, "size": [8, 8], "mean": [0.5], "std": [0.25]}}))
    loaded = load_model(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name

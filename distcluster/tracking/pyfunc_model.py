"""distcluster's MLflow pyfunc model (MLflow's models-from-code: this file is the model's code).

MLflow copies this file into every logged model and runs it when a user calls
`mlflow.pyfunc.load_model(...)` or `mlflow models serve`; it rebuilds the network with
distcluster's own code from the model's `weights.safetensors` and `config.json`.
distcluster's own commands (predict, evaluate) never run it: they read those two
files directly.

Input: a batch of images, uint8, shape (N, H, W, C) (any size and 1 or 3 channels:
they are converted and resized as predict does). Output: one row per image with
`cluster`, `confidence` (that cluster's probability) and `p0` ... `p{K-1}`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


class ClusterAssigner(PythonModel):
    def load_context(self, context: Any) -> None:
        from distcluster.engine.exported import load_model

        self.loaded = load_model(Path(context.artifacts["model"]))

    # An ndarray hint is one MLflow infers no schema from (the signature in MLmodel is the schema);
    # without any, MLflow warned at every save that predict has no type hints.
    def predict(self, context: Any, model_input: np.ndarray, params: dict | None = None) -> Any:
        from distcluster.engine.exported import assignment_table

        return assignment_table(self.loaded, np.asarray(model_input))


mlflow.models.set_model(ClusterAssigner())

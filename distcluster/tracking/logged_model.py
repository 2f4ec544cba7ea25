"""The MLflow Model every run logs under `model/`: the pyfunc flavour, by models-from-code.

The folder holds MLflow's `MLmodel` (pyfunc flavour, signature, input example),
pinned pip requirements, the code file `pyfunc_model.py` (it imports distcluster,
which must be installed where the model is loaded), and distcluster's two
model files under `artifacts/model/` (weights.safetensors + config.json), which
`distcluster.predict` and `evaluate` read directly. `mlflow.pyfunc.load_model` and
`mlflow models serve` run pyfunc_model.py, which rebuilds the network from them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from distcluster.engine.exported import LoadedModel, export_model, load_model, probability_columns
from distcluster.tracking.runs import environment_restored

MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
EXAMPLE_IMAGES = 2


def save_mlflow_model(state: dict[str, Any], folder: Path) -> None:
    """Write the MLflow Model of checkpoint `state` into the empty folder `folder`."""
    import mlflow.pyfunc

    with tempfile.TemporaryDirectory() as scratch:
        files = Path(scratch) / "model"
        files.mkdir()
        export_model(state, files)
        loaded = load_model(files)
        with _without_mlflow_chatter():
            mlflow.pyfunc.save_model(str(folder), python_model=str(MODEL_CODE),
                                     artifacts={"model": str(files)}, signature=signature(loaded),
                                     input_example=example_images(loaded),
                                     pip_requirements=pip_requirements())


@contextlib.contextmanager
def _without_mlflow_chatter() -> Iterator[None]:
    """Without what MLflow's save_model printed at the end of every run: a download bar while it
    copies the model files in, and an INFO line while it checks the input example."""
    logger, bar = logging.getLogger("mlflow.pyfunc"), "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    level = logger.level
    with environment_restored((bar,)):
        os.environ[bar] = "false"
        logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            logger.setLevel(level)


def example_images(loaded: LoadedModel) -> np.ndarray:
    """A small batch of uint8 images the model takes (N, H, W, C)."""
    height, width = loaded.size
    gen = np.random.default_rng(0)
    return gen.integers(0, 256, (EXAMPLE_IMAGES, height, width, loaded.channels), dtype=np.uint8)


def signature(loaded: LoadedModel) -> Any:
    """uint8 images (N, H, W, C) in; cluster, confidence and the K probabilities out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    height, width = loaded.size
    images = TensorSpec(np.dtype(np.uint8), (-1, height, width, loaded.channels))
    outputs = [ColSpec("long", "cluster"), ColSpec("double", "confidence")]
    outputs += [ColSpec("double", name) for name in probability_columns(loaded.clusters)]
    return ModelSignature(inputs=Schema([images]), outputs=Schema(outputs))


SERVING_REQUIREMENTS = ("torch", "torchvision", "numpy", "pandas", "safetensors", "mlflow", "pyyaml", "tqdm",
                        "pillow", "scipy", "scikit-learn")  # what loading and predicting imports


def pip_requirements() -> list[str]:
    """distcluster's dependencies that the model needs, at the versions installed here."""
    names = SERVING_REQUIREMENTS
    return [f"{name}=={metadata.version(name)}" for name in names]

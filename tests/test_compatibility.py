"""Models logged by earlier versions still load: the fixture is an MLflow model logged by
distcluster 0.1.0 before its sub-packages (its own pyfunc_model.py imports
distcluster.inference.load_model), with the clusters that version assigned to 32 digits."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

OLD_MODEL = Path(__file__).parent / "fixtures" / "model-0.1.0-flat"


@pytest.mark.slow  # imports MLflow's pyfunc loader
def test_a_model_logged_before_the_sub_packages_loads_and_assigns_as_it_did(tmp_path):
    import mlflow.pyfunc

    expected = json.loads((OLD_MODEL / "expected.json").read_text())
    images = np.load(OLD_MODEL / "digits32.npy")
    shutil.copytree(OLD_MODEL, tmp_path / "model")  # MLflow may write next to a model it loads
    table = mlflow.pyfunc.load_model(str(tmp_path / "model")).predict(images)
    assert table["cluster"].tolist() == expected["cluster"]
    probabilities = table[[f"p{k}" for k in range(10)]].to_numpy()
    assert np.allclose(probabilities, expected["probabilities"], atol=1e-6)


def test_the_old_models_files_load_with_todays_loader():
    from distcluster.engine.exported import assignment_table, load_model

    expected = json.loads((OLD_MODEL / "expected.json").read_text())
    table = assignment_table(load_model(OLD_MODEL), np.load(OLD_MODEL / "digits32.npy"))
    probabilities = table[[f"p{k}" for k in range(10)]].to_numpy()
    assert np.allclose(probabilities, expected["probabilities"], atol=1e-6)

"""What every run's logged `model/` must hold: an MLflow pyfunc model around distcluster's two files."""

from mlflow.tracking import MlflowClient


def assert_logged_model(client: MlflowClient, run_id: str) -> None:
    top = {a.path for a in client.list_artifacts(run_id, "model")}
    assert {"model/MLmodel", "model/requirements.txt", "model/input_example.json",
            "model/artifacts"} <= top, top
    files = {a.path for a in client.list_artifacts(run_id, "model/artifacts/model")}
    assert files == {"model/artifacts/model/weights.safetensors", "model/artifacts/model/config.json"}
    mlmodel = client.download_artifacts(run_id, "model/MLmodel")
    text = open(mlmodel).read()
    assert "python_function" in text and "signature" in text and "uint8" in text, text

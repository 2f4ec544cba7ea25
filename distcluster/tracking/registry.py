"""The MLflow model registry: register a run's model, and fetch any model URI to a folder.

Model URIs: `models:/NAME@ALIAS` (MLflow resolves the reserved alias `latest` to
the newest version), `models:/NAME/VERSION`, `runs:/RUN_ID/model`, or a local
folder (a run's output, its `model/`, or a checkpoint folder).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from distcluster.common.errors import UserError
from distcluster.tracking.runs import RunTracker, check_reachable, environment_restored, resolve_tracking_uri

REMOTE_PREFIXES = ("models:/", "runs:/")


def register(tracker: RunTracker, name: str, artifact_path: str = "model") -> str:
    """A new version of registered model `name` from this run's model; returns the version."""
    client = tracker.client
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="distcluster clustering model (MLflow pyfunc; "
                                       "weights.safetensors + config.json under artifacts/model)")
    source = f"{client.get_run(tracker.run_id).info.artifact_uri}/{artifact_path}"
    version = client.create_model_version(name, source, run_id=tracker.run_id)
    return str(version.version)


def fetch_model(uri: str, tracking_uri: str = "",
                progress: bool = True) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    """A local folder holding the model (and the temporary directory to clean up, if any);
    without `progress`, MLflow draws no download bar."""
    if not uri.startswith(REMOTE_PREFIXES):
        folder = Path(uri)
        if folder.is_file():
            raise UserError(f"--model {uri} is a file: name the folder that holds it (a run's output, "
                            "its model/ or its checkpoint/)")
        if not folder.is_dir():
            raise UserError(f"model not found: {uri} (expected models:/NAME@ALIAS, models:/NAME/VERSION, "
                            "runs:/RUN_ID/model or a folder)")
        return folder, None
    tracking = resolve_tracking_uri(tracking_uri)
    if tracking.startswith("sqlite:///") and not Path(tracking.removeprefix("sqlite:///")).exists():
        raise UserError(f"cannot load {uri}: no MLflow database at {tracking} (--tracking-uri or "
                        "MLFLOW_TRACKING_URI names the store the model was logged to)")  # none created
    check_reachable(tracking)
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    scratch = tempfile.TemporaryDirectory(prefix="distcluster-model-")
    try:
        with _mlflow_pointed_at(tracking, progress):
            local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=scratch.name,
                                                        tracking_uri=tracking)
    except MlflowException as exc:
        scratch.cleanup()
        raise UserError(f"cannot load {uri} from {tracking}: {exc.message.splitlines()[0][:200]}") from None
    except OSError as exc:
        scratch.cleanup()
        raise UserError(f"cannot load {uri} from {tracking}: {exc}") from None
    return Path(local), scratch


# What MLflow reads process-wide during a lookup, in os.environ (MLflow's setters write there too)
MLFLOW_SETTINGS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")


@contextlib.contextmanager
def _mlflow_pointed_at(tracking: str, progress: bool) -> Iterator[None]:
    """MLflow's process-wide tracking and registry URIs set to `tracking` for the block (else a
    models:/ lookup opens ./mlflow.db for parts of it), the download bar off without `progress`;
    afterwards all put back as they were, in MLflow and in os.environ, so that a Python caller's
    own MLflow settings, and the environment its later subprocesses inherit, stay its own (for
    a caller that does not use MLflow from another thread meanwhile: the settings are global)."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_settings
    from mlflow.tracking._tracking_service import utils as tracking_settings

    # what MLflow's setters last set (None: never set), in module variables of its own
    before = (getattr(tracking_settings, "_tracking_uri", None),
              getattr(registry_settings, "_registry_uri", None))
    with environment_restored(MLFLOW_SETTINGS):
        try:
            mlflow.set_tracking_uri(tracking)
            mlflow.set_registry_uri(tracking)
            if not progress:
                os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
            yield
        finally:
            mlflow.set_tracking_uri(before[0])
            mlflow.set_registry_uri(before[1])

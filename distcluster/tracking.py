"""MLflow tracking: one run per training job; rank 0 logs epochs into it by run id."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from distcluster.errors import UserError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(explicit: str = "") -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else ./mlflow.db; sqlite paths made absolute
    so that Ray workers (which run in other folders) write to the same database."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri.removeprefix(prefix)).resolve())
    return uri


class RunTracker:
    """A thin wrapper over MlflowClient bound to one run."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri)

    @classmethod
    def start(cls, tracking_uri: str, experiment: str, run_name: str,
              tags: dict[str, str] | None = None) -> RunTracker:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
        try:
            found = client.get_experiment_by_name(experiment)
        except Exception as exc:  # any failure to reach the store is the user's URI
            raise UserError(f"cannot reach MLflow at {tracking_uri}: {exc}") from None
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
        run = client.create_run(experiment_id, run_name=run_name, tags=tags or {})
        tracker = cls(tracking_uri, run.info.run_id)
        tracker.experiment_id = experiment_id
        return tracker

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items)

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)

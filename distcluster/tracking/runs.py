"""MLflow tracking: one run per training job; rank 0 logs epochs into it by run id."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from distcluster.common.errors import UserError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TRACKING_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks", "file")
# A lost server must not stall training for minutes of retries (the user's values win).
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


@contextlib.contextmanager
def environment_restored(names: tuple[str, ...]) -> Iterator[None]:
    """The block may set or remove the environment variables `names`: afterwards each has its
    value from before again (or is absent again)."""
    before = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def quiet_store_setup() -> None:
    """MLflow's INFO lines while it creates or upgrades a sqlite store's tables ("Creating initial
    MLflow database tables...") stay out of the user's terminal; warnings still show. After
    mlflow's import, which configures its loggers. Nor does MLflow print a "View run ... at"
    link on stdout for every run it ends on a server (every trial of a sweep): the commands
    print their run's id or model URI with their result."""
    import mlflow  # noqa: F401 - its logging set up first

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

    for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)


def resolve_tracking_uri(explicit: str = "") -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else ./mlflow.db; sqlite paths made absolute
    so that Ray workers (which run in other folders) write to the same database."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri.removeprefix(prefix)).resolve())
    return uri


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Exit 2 before any training when the tracking store cannot be reached."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
                return
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UserError(f"cannot reach MLflow at {uri}: {reason}") from None
    scheme = uri.split(":", 1)[0] if ":" in uri else ""
    if scheme not in TRACKING_SCHEMES:
        raise UserError(f"tracking URI {uri}: unknown scheme '{scheme}' (expected one of "
                        f"{', '.join(TRACKING_SCHEMES)})")
    if scheme == "sqlite":
        _check_sqlite(uri, Path(uri.removeprefix("sqlite:///")))


def _check_sqlite(uri: str, path: Path) -> None:
    """An SQLite store is a creatable or existing, writable SQLite file."""
    if not path.parent.is_dir():
        raise UserError(f"cannot use MLflow at {uri}: folder {path.parent} does not exist")
    if path.exists() and not path.is_file():
        raise UserError(f"cannot use MLflow at {uri}: {path} is not a file")
    if path.is_file():
        with open(path, "rb") as handle:
            head = handle.read(16)
        if head and head != b"SQLite format 3\0":
            raise UserError(f"cannot use MLflow at {uri}: {path} is not an SQLite database")
    if not os.access(path if path.exists() else path.parent, os.W_OK):
        raise UserError(f"cannot use MLflow at {uri}: {path} is read-only")


class RunTracker:
    """A thin wrapper over MlflowClient bound to one run.

    Once the run exists, losing the server never stops training: the first
    failed call prints one warning and later calls are skipped (`lost`).
    """

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        from mlflow.tracking import MlflowClient

        quiet_store_setup()
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri)
        self.lost = False

    def _safely(self, call: Callable[[], Any]) -> None:
        if self.lost:
            return
        try:
            call()
        except Exception as exc:  # noqa: BLE001 - any failure of the store
            self.lost = True
            print(f"warning: lost MLflow at {self.tracking_uri} ({type(exc).__name__}: "
                  f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); training continues, "
                  "results stay in summary.json", file=sys.stderr, flush=True)

    @classmethod
    def resume(cls, tracking_uri: str, run_id: str) -> RunTracker:
        """Re-open an existing run (a resumed training job logs into the same run)."""
        tracker = cls(tracking_uri, run_id)
        try:
            run = tracker.client.get_run(run_id)
            tracker.client.update_run(run_id, status="RUNNING")
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"cannot resume MLflow run {run_id} at {tracking_uri}: {exc}") from None
        tracker.experiment_id = run.info.experiment_id
        return tracker

    @classmethod
    def start(cls, tracking_uri: str, experiment: str, run_name: str,
              tags: dict[str, str] | None = None) -> RunTracker:
        from mlflow.tracking import MlflowClient

        quiet_store_setup()
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
            self._safely(lambda i=i: self.client.log_batch(self.run_id, params=items[i:i + 100]))

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
        self._safely(lambda: self.client.log_batch(self.run_id, tags=items))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._safely(lambda: self.client.log_batch(self.run_id, metrics=items))

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        self._safely(lambda: self.client.log_artifacts(self.run_id, str(folder), artifact_path))

    def log_artifact(self, path: Path) -> None:
        self._safely(lambda: self.client.log_artifact(self.run_id, str(path)))

    def finish(self, status: str = "FINISHED") -> None:
        self._safely(lambda: self.client.set_terminated(self.run_id, status))

    @contextlib.contextmanager
    def ending(self) -> Iterator[RunTracker]:
        """Ends the MLflow run the way the block ends: FINISHED, KILLED on Ctrl-C (the same
        command resumes it), FAILED on any other exception (raised on)."""
        try:
            yield self
        except KeyboardInterrupt:
            self.finish("KILLED")
            raise
        except BaseException:
            self.finish("FAILED")
            raise
        self.finish()

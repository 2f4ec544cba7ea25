"""`ray job submit -- python -m distcluster.train` against a real `ray start --head` on 127.0.0.1,
with Ray's token authentication on."""

import json
import os
import subprocess
import time

import pytest
from mlflow.tracking import MlflowClient
from servers import RAY

pytestmark = pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`


def submit(address: str, env: dict[str, str], *argv: str) -> subprocess.CompletedProcess:
    """`ray job submit`, again while the head answers "No available agent to submit job, please
    try again later": its job agent registers some seconds after the head serves requests (up
    to a minute on a busy machine)."""
    deadline = time.monotonic() + 120
    while True:
        done = subprocess.run([RAY, "job", "submit", "--address", address, *argv], env=env,
                              capture_output=True, text=True, timeout=600)
        if "No available agent" not in done.stderr or time.monotonic() > deadline:
            return done
        time.sleep(2)


def test_ray_job_submit_trains_and_lands_its_run_in_mlflow(tmp_path, ray_cluster):
    address, env = ray_cluster.dashboard, ray_cluster.job_env()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    entrypoint = ["python", "-m", "distcluster.train", "--epochs", "2", "--batch-size", "64",
                  "--set", "max_samples=256", "--output", str(tmp_path / "out"), "--run-name", "job",
                  "--tracking-uri", uri, "--experiment", "ray-jobs"]
    # Settings in the job's runtime env, one of them also one distcluster forwards to its Ray
    # processes (Ray refuses to merge a variable named twice).
    settings = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1",
                "DISTCLUSTER_CACHE": os.environ["DISTCLUSTER_CACHE"]}
    submitted = submit(address, env, "--submission-id", "dc-test",
                       "--runtime-env-json", json.dumps({"env_vars": settings}), "--", *entrypoint)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    status = subprocess.run([RAY, "job", "status", "--address", address, "dc-test"], env=env,
                            capture_output=True, text=True)
    assert "Job 'dc-test' succeeded" in status.stdout  # status SUCCEEDED
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ray-jobs").experiment_id])
    assert [r.info.run_name for r in runs] == ["job"] and runs[0].info.status == "FINISHED"
    assert (tmp_path / "out" / "summary.json").is_file()


def test_without_the_token_the_cluster_refuses_jobs(tmp_path, ray_cluster):
    address, env = ray_cluster.dashboard, ray_cluster.job_env()
    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    no_token["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "wrong-token")
    (tmp_path / "wrong-token").write_text("not-the-token")
    refused = subprocess.run([RAY, "job", "list", "--address", address], env=no_token,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "AuthenticationError: Authentication failed: Forbidden: Invalid authentication token" in (
        refused.stderr), refused.stderr[-2000:]  # refused for the token, not for some other reason

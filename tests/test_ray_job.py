"""`ray job submit -- python -m distcluster.train` against a real `ray start --head` on 127.0.0.1,
with Ray's token authentication on."""

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from servers import free_port

pytestmark = pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`

RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A one-node Ray cluster, stopped afterwards by killing the process group it started in."""
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # Ray's socket paths must stay short
    # As the README: the venv activated (its bin first on PATH) before `ray start`, so that the
    # job's plain `python` is the venv's.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    dashboard = free_port()
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={free_port()}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180
        while subprocess.run([RAY, "job", "list", "--address", address], env=env,
                             capture_output=True).returncode != 0:
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the Ray head did not come up"
            time.sleep(1)
        yield address, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_trains_and_lands_its_run_in_mlflow(tmp_path, ray_head):
    address, env = ray_head
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    entrypoint = ["python", "-m", "distcluster.train", "--epochs", "2", "--batch-size", "64",
                  "--set", "max_samples=256", "--output", str(tmp_path / "out"), "--run-name", "job",
                  "--tracking-uri", uri, "--experiment", "ray-jobs"]
    submitted = subprocess.run([RAY, "job", "submit", "--address", address, "--submission-id", "dc-test",
                                "--", *entrypoint], env=env, capture_output=True, text=True, timeout=600)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    status = subprocess.run([RAY, "job", "status", "--address", address, "dc-test"], env=env,
                            capture_output=True, text=True)
    assert "Job 'dc-test' succeeded" in status.stdout  # status SUCCEEDED
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("ray-jobs").experiment_id])
    assert [r.info.run_name for r in runs] == ["job"] and runs[0].info.status == "FINISHED"
    assert (tmp_path / "out" / "summary.json").is_file()


def test_without_the_token_the_cluster_refuses_jobs(tmp_path, ray_head):
    address, env = ray_head
    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    no_token["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "wrong-token")
    (tmp_path / "wrong-token").write_text("not-the-token")
    refused = subprocess.run([RAY, "job", "list", "--address", address], env=no_token,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "AuthenticationError: Authentication failed: Forbidden: Invalid authentication token" in (
        refused.stderr), refused.stderr[-2000:]  # refused for the token, not for some other reason

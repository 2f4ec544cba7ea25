"""`ray job submit -- python -m distcluster.train` against a real `ray start --head` on 127.0.0.1,
with Ray's token authentication on."""

import subprocess

import pytest
from mlflow.tracking import MlflowClient
from servers import RAY, ray_head

pytestmark = pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`


@pytest.fixture(scope="module")
def job_cluster():
    """A head of its own: job submission wants the head's job agent fresh, not one other tests
    have kept busy (it answered "No available agent" late in a shared session)."""
    with ray_head() as head:
        yield head

def test_ray_job_submit_trains_and_lands_its_run_in_mlflow(tmp_path, job_cluster):
    address, env = job_cluster.dashboard, job_cluster.job_env()
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


def test_without_the_token_the_cluster_refuses_jobs(tmp_path, job_cluster):
    address, env = job_cluster.dashboard, job_cluster.job_env()
    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
    no_token["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "wrong-token")
    (tmp_path / "wrong-token").write_text("not-the-token")
    refused = subprocess.run([RAY, "job", "list", "--address", address], env=no_token,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "AuthenticationError: Authentication failed: Forbidden: Invalid authentication token" in (
        refused.stderr), refused.stderr[-2000:]  # refused for the token, not for some other reason

"""A real 2-worker Ray Train run of `python -m distcluster.train` on a digits subset, submitted as
users do (`ray job submit -- python -m distcluster.train`) to a real `ray start --head` on
127.0.0.1 with Ray's token authentication on."""

import json
import os
import subprocess
import time

import numpy as np
import pytest
from logged_model import assert_logged_model
from mlflow.tracking import MlflowClient
from servers import RAY
from training_runs import assert_one_line_per_event

from distcluster.core.metrics import cluster_scores
from distcluster.data.arrays import load_source

pytestmark = pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`

EPOCHS = 3


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


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory, ray_cluster):
    """The submitted run: its folder, tracking URI, and the job's whole output as `ray job logs`
    gives it once the job has ended (its Ray workers' lines included; what `ray job submit`
    streams while it waits may miss the last lines)."""
    folder = tmp_path_factory.mktemp("e2e")
    uri = f"sqlite:///{folder}/mlflow.db"
    # the job's plain `python` is the venv's: the head was started with the venv first on PATH
    entrypoint = ["python", "-m", "distcluster.train", "--workers", "2", "--epochs", str(EPOCHS),
                  "--batch-size", "128", "--set", "max_samples=512", "--output", str(folder / "out"),
                  "--tracking-uri", uri, "--experiment", "e2e", "--run-name", "two-workers"]
    # Settings in the job's runtime env, one of them also one distcluster forwards to its Ray
    # processes (Ray refuses to merge a variable named twice).
    settings = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1",
                "DISTCLUSTER_CACHE": os.environ["DISTCLUSTER_CACHE"]}
    done = submit(ray_cluster.dashboard, ray_cluster.job_env(), "--submission-id", "dc-e2e",
                  "--runtime-env-json", json.dumps({"env_vars": settings}), "--", *entrypoint)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    logs = subprocess.run([RAY, "job", "logs", "--address", ray_cluster.dashboard, "dc-e2e"],
                          env=ray_cluster.job_env(), capture_output=True, text=True, timeout=120)
    assert logs.returncode == 0, logs.stderr[-3000:]
    return folder, uri, logs.stdout


def chance_acc(count: int, draws: int = 200) -> float:
    """The best ACC of `draws` random assignments to 10 clusters of the first `count` digits: what
    a model that learned nothing could reach by luck."""
    labels = load_source("digits", count).labels.numpy()
    rng = np.random.default_rng(0)
    return max(cluster_scores(labels, rng.integers(0, 10, len(labels)))["acc"] for _ in range(draws))


def test_the_cluster_reports_the_job_succeeded(ray_run, ray_cluster):
    status = subprocess.run([RAY, "job", "status", "--address", ray_cluster.dashboard, "dc-e2e"],
                            env=ray_cluster.job_env(), capture_output=True, text=True, timeout=120)
    assert "Job 'dc-e2e' succeeded" in status.stdout, status.stdout + status.stderr  # status SUCCEEDED


def test_summary_json_has_the_contracted_fields(ray_run):
    folder, uri, _ = ray_run
    summary = json.loads((folder / "out" / "summary.json").read_text())
    assert summary["objective"] == "imc_swav" and summary["data"] == "digits"
    assert (summary["num_samples"], summary["workers"], summary["epochs"]) == (512, 2, EPOCHS)
    assert summary["restarts"] == 0 and summary["device"] == "cpu"
    assert set(summary["metrics"]) == {"acc", "nmi", "ari"}
    assert chance_acc(512) < summary["metrics"]["acc"] <= 1.0
    assert summary["train_images_per_second"] > 0 and summary["wall_seconds"] > 0
    assert 0.1 < summary["worker_peak_rss_gib"] < 24  # GiB, the largest of any worker
    assert (folder / "out" / "checkpoint" / "checkpoint.pt").is_file()
    assert summary["mlflow"]["tracking_uri"] == uri
    assert summary["mlflow"]["model_uri"] == f"runs:/{summary['mlflow']['run_id']}/model"


def test_the_scores_two_workers_shared_are_those_of_one_process_on_the_final_checkpoint(ray_run):
    """Each worker assigned its share with rank 0's weights and BatchNorm statistics: scoring the
    final checkpoint again in this process gives the summary's scores (a worker that kept its
    own statistics, or a share assigned twice, would not)."""
    from distcluster.engine.checkpoint import verified_checkpoint
    from distcluster.engine.evaluation import assign_checkpoint, clustering_scores

    folder, _, _ = ray_run
    summary = json.loads((folder / "out" / "summary.json").read_text())
    state = verified_checkpoint(folder / "out" / "checkpoint")
    source = load_source("digits", 512)
    again = clustering_scores(assign_checkpoint(state, source), source.labels)
    assert {k: again[k] for k in summary["metrics"]} == pytest.approx(summary["metrics"], abs=1e-9)
    assert np.array_equal(assign_checkpoint(state, source).clusters,
                          state["assignments"]["clusters"].numpy())


def test_rank_zero_logged_every_epoch_to_the_mlflow_run(ray_run):
    folder, uri, _ = ray_run
    summary = json.loads((folder / "out" / "summary.json").read_text())
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert [r.info.run_id for r in runs] == [summary["mlflow"]["run_id"]]  # the job's one run
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "two-workers"
    assert run.data.params["workers"] == "2" and run.data.params["objective"] == "imc_swav"
    for key in ("train/loss", "train/swav", "train/mi", "eval/acc", "eval/nmi", "eval/balance",
                "eval/largest_cluster", "train/images_per_second"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == list(range(1, EPOCHS + 1)), key
    final_acc = client.get_metric_history(run.info.run_id, "final/acc")[0].value
    assert final_acc == pytest.approx(summary["metrics"]["acc"])
    assert_logged_model(client, run.info.run_id)


def test_both_workers_trained_and_output_is_readable(ray_run):
    _, _, printed = ray_run
    assert_one_line_per_event(printed, EPOCHS, workers=2)
    steps = EPOCHS * (512 // 128)
    for rank in (0, 1):  # every worker says it finished, with the same steps
        assert f"rank {rank} of 2: done, {EPOCHS} epochs, {steps} steps" in printed, printed[-3000:]
    assert "Reporting training result" not in printed
    # nor MLflow's words while the model is saved (a type-hint warning, an INFO line, a download bar)
    for chatter in ("Add type hints", "Validating input example", "Downloading artifacts"):
        assert chatter not in printed, chatter
    assert any(line.startswith("imc_swav on digits: ACC") for line in printed.splitlines())


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

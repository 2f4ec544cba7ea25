"""A real 2-worker Ray Train run of `python -m distcluster.train` on a digits subset."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from logged_model import assert_logged_model
from mlflow.tracking import MlflowClient

from distcluster.data import load_source
from distcluster.metrics import cluster_scores

pytestmark = pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`

EPOCHS = 3


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory, ray_cluster):
    folder = tmp_path_factory.mktemp("e2e")
    uri = f"sqlite:///{folder}/mlflow.db"
    argv = [sys.executable, "-m", "distcluster.train", "--workers", "2", "--epochs", str(EPOCHS),
            "--batch-size", "128", "--set", "max_samples=512", "--output", str(folder / "out"),
            "--tracking-uri", uri, "--experiment", "e2e", "--run-name", "two-workers"]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=folder, timeout=600,
                          env={**os.environ, **ray_cluster.env})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return folder, uri, done


def chance_acc(count: int, draws: int = 200) -> float:
    """The best ACC of `draws` random assignments to 10 clusters of the first `count` digits: what
    a model that learned nothing could reach by luck."""
    labels = load_source("digits", count).labels.numpy()
    rng = np.random.default_rng(0)
    return max(cluster_scores(labels, rng.integers(0, 10, len(labels)))["acc"] for _ in range(draws))


def test_summary_json_has_the_contracted_fields(ray_run):
    folder, uri, _ = ray_run
    summary = json.loads((folder / "out" / "summary.json").read_text())
    assert summary["objective"] == "imc_swav" and summary["data"] == "digits"
    assert (summary["num_samples"], summary["workers"], summary["epochs"]) == (512, 2, EPOCHS)
    assert summary["restarts"] == 0 and summary["device"] == "cpu"
    assert set(summary["metrics"]) == {"acc", "nmi", "ari"}
    assert chance_acc(512) < summary["metrics"]["acc"] <= 1.0
    assert summary["train_images_per_second"] > 0 and summary["wall_seconds"] > 0
    assert (folder / "out" / "checkpoint" / "checkpoint.pt").is_file()
    assert summary["mlflow"]["tracking_uri"] == uri
    assert summary["mlflow"]["model_uri"] == f"runs:/{summary['mlflow']['run_id']}/model"


def test_rank_zero_logged_every_epoch_to_the_mlflow_run(ray_run):
    folder, uri, _ = ray_run
    summary = json.loads((folder / "out" / "summary.json").read_text())
    client = MlflowClient(uri)
    run = client.get_run(summary["mlflow"]["run_id"])
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
    _, _, done = ray_run
    assert done.stdout.count("epoch 3/3") >= 1
    steps = EPOCHS * (512 // 128)
    for rank in (0, 1):  # every worker says it finished, with the same steps
        assert f"rank {rank} of 2: done, {EPOCHS} epochs, {steps} steps" in done.stdout, done.stdout[-3000:]
    assert "Reporting training result" not in done.stdout + done.stderr
    assert any(line.startswith("imc_swav on digits: ACC") for line in done.stdout.splitlines())

"""Guards and interruptions on real processes: non-finite losses, a diverging run, cluster
collapse, an MLflow server that is closed or lost, a killed worker, and Ctrl-C. (A killed driver:
test_recovery.py; a dead node: test_elastic.py.)"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient
from recorder import Recorder
from servers import free_port, start_mlflow_server, stop_server, wait_for
from training_runs import (
    PACED,
    RUN,
    Output,
    kill_driver,
    ray_checkpoints,
    run_train,
    train_command,
    wait_while_running,
    worker_pid,
)

from distcluster.config import from_dict, load_recipe
from distcluster.data.arrays import load_source
from distcluster.engine.build import WorkerContext
from distcluster.engine.loop import train_loop

# ---- guards ----------------------------------------------------------------------------------


# In-process the host checks every step; on 2 workers every 4th, the skip itself done on the device.
GUARDS = [("0", "1"), ("2", "4")]


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
@pytest.mark.parametrize("workers, check_every", GUARDS)
def test_non_finite_steps_are_skipped_until_too_many_in_a_row_end_the_run_with_exit_1(
        tmp_path, ray_cluster, workers, check_every):
    # Two non-finite steps in the first epoch are skipped; from the 3rd epoch (4 steps per epoch)
    # on every step is, and the third in a row ends the run.
    steps = ",".join(str(s) for s in (2, 3, *range(9, 200)))
    done = run_train(tmp_path, "diverged", *RUN, "--workers", workers, "--set", "max_bad_steps=3",
                     "--set", f"speed.check_every={check_every}",
                     env={**ray_cluster.env, "DISTCLUSTER_TEST_NAN_STEPS": steps})
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    expected = "distcluster.train: failed: loss or gradients not finite for 3 consecutive steps (by step 12,"
    assert last.startswith(expected), last
    assert not (tmp_path / "diverged" / "summary.json").exists()
    if workers == "0":
        kept = sorted((tmp_path / "diverged" / "checkpoints").glob("epoch-*"))
        assert [p.name for p in kept] == ["epoch-00001", "epoch-00002"]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("distcluster").experiment_id])[0]
    assert run.info.status == "FAILED"
    skipped = client.get_metric_history(run.info.run_id, "train/skipped_steps")
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in skipped] == [(1, 2.0), (2, 0.0)]  # skipped, and training went on
    assert [m.step for m in losses] == [1, 2] and all(math.isfinite(m.value) for m in losses)


def test_cluster_collapse_is_flagged_after_warm_up():
    values = {**load_recipe("digits-imc-swav"), "epochs": 3, "batch_size": 128,
              "collapse_threshold": 0.05, "collapse_after_epochs": 1}
    recorder, lines = Recorder(), []
    train_loop(from_dict(values), load_source("digits", 256), WorkerContext(), recorder, log=lines.append)
    assert [m["eval/collapsed"] for m in recorder.epochs] == [0.0, 1.0, 1.0]
    assert sum("warning: cluster collapse" in line for line in lines) == 2


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_unreachable_mlflow_exits_2_before_training(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "distcluster.train", "--workers", "0", "--tracking-uri", uri,
                           "--output", str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert f"cannot reach MLflow at {uri}" in done.stderr
    assert not (tmp_path / "out").exists() and time.monotonic() - started < 60


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_mlflow_lost_mid_run_warns_and_training_finishes(tmp_path):
    server, uri = start_mlflow_server(tmp_path)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "distcluster.train", *RUN, "--workers", "0", "--epochs", "4",
             "--tracking-uri", uri, "--output", str(tmp_path / "out"), "--run-name", "lost"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: (tmp_path / "out" / "run.json").exists() or process.poll() is not None,
                 what="the run to start")
    finally:
        stop_server(server)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    assert f"warning: lost MLflow at {uri}" in err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["mlflow"]["lost"] and summary["epochs"] == 4


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_a_killed_worker_restarts_in_place_and_ctrl_c_then_ends_the_run_like_in_process(
        tmp_path, ray_cluster):
    """A fixed 1-worker run on the session's Ray head: its worker SIGKILLed (the node lives on),
    Ray restarts it in place from the last committed checkpoint, not the start; then SIGINT to
    the driver: one 'interrupted' line, exit 130, and the MLflow run KILLED (not FAILED)."""
    process = subprocess.Popen(train_command(tmp_path, "ctrl-c", *RUN, "--workers", "1"), cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **ray_cluster.env, **PACED}, start_new_session=True)
    printed, errors = Output(process), Output(process, process.stderr)
    try:
        # a checkpoint counts once every rank has reported it: the second one's arrival proves the first
        wait_while_running(process, lambda: len(ray_checkpoints(tmp_path, "ctrl-c")) >= 2, "two checkpoints",
                           errors)
        os.kill(worker_pid(printed), signal.SIGKILL)
        wait_while_running(process, lambda: len(group_starts(printed)) >= 2, "the worker to restart", errors)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
    finally:
        kill_driver(process)  # when the test failed midway: no driver left holding the head's CPUs
    assert process.returncode == 130, errors.text()[-3000:]
    assert errors.text().strip().splitlines()[-1] == "distcluster.train: interrupted"
    starts = group_starts(printed)
    assert starts[0] == 0 and starts[1] >= 1, starts  # restarted from a checkpoint, not the start
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("distcluster").experiment_id])[0]
    assert run.info.status == "KILLED"
    assert not (tmp_path / "ctrl-c" / "summary.json").exists()


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_sigterm_ends_a_ray_run_like_ctrl_c_with_exit_143(tmp_path, ray_cluster):
    """What timeout, systemd and Kubernetes send: Ray's own handler would end the driver on the
    spot, skipping its clean-up (a local instance's temp folder stayed behind)."""
    process = subprocess.Popen(train_command(tmp_path, "term", *RUN, "--workers", "1"), cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **ray_cluster.env, **PACED}, start_new_session=True)
    errors = Output(process, process.stderr)
    try:
        wait_while_running(process, lambda: len(ray_checkpoints(tmp_path, "term")) >= 1, "a checkpoint",
                           errors)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
    finally:
        kill_driver(process)
    assert process.returncode == 143, errors.text()[-3000:]
    assert errors.text().strip().splitlines()[-1] == "distcluster.train: terminated"
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("distcluster").experiment_id])[0]
    assert run.info.status == "KILLED"


def group_starts(printed: Output) -> list[int]:
    """The epoch each start of the worker group resumed at, as the worker printed it."""
    starts = re.findall(r"training on 1 worker from epoch (\d+)", printed.so_far())
    return [int(epoch) for epoch in starts]

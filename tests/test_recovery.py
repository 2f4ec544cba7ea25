"""Surviving failures on real processes: a killed Ray worker, a killed driver, and damaged
checkpoints."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile

import pytest
import torch
from mlflow.tracking import MlflowClient
from servers import wait_for
from training_runs import EPOCHS, PACED, RUN, Output, ray_checkpoints, run_train, summary_of, train_command

from distcluster.checkpoint import newest_valid_checkpoint, save_checkpoint

pytestmark = pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, ray_cluster) -> dict:
    folder = tmp_path_factory.mktemp("baseline")
    done = run_train(folder, "baseline", *RUN, env=ray_cluster.env)
    assert done.returncode == 0, done.stderr[-3000:]
    return summary_of(folder, "baseline")


def own_ray_workers(driver_pid: int) -> list[int]:
    """The Ray Train workers of this test's own run: the driver started its local Ray instance
    (address="local"), so they are in its process tree, and no other Ray job's are."""
    import psutil

    workers = []
    for child in psutil.Process(driver_pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(child.cmdline()):
                workers.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return workers


def test_a_run_outlives_a_killed_worker_then_its_killed_driver_and_a_truncated_checkpoint(
        tmp_path, uninterrupted):
    """Three failures met by one run (one run for the three keeps the suite short): Ray restarts
    the group when a worker is SIGKILLed; when the driver is SIGKILLed later, the same command
    resumes from the newest checkpoint that verifies."""
    ray_temp = tempfile.mkdtemp(prefix="dr", dir="/tmp")  # a killed driver cannot remove its own
    process = subprocess.Popen(train_command(tmp_path, "run", *RUN), cwd=tmp_path, text=True,
                               env={**os.environ, **PACED, "RAY_TMPDIR": ray_temp},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    output = Output(process)
    try:
        # a checkpoint counts once every rank has reported it: the second one's arrival proves the first
        wait_for(lambda: len(ray_checkpoints(tmp_path, "run")) >= 2 or process.poll() is not None,
                 what="a committed checkpoint")
        pids = own_ray_workers(process.pid)
        assert pids, "no Ray Train worker process found under the driver"
        os.kill(pids[-1], signal.SIGKILL)
        wait_for(lambda: len(group_starts(output)) >= 2 or process.poll() is not None,
                 what="the group to restart")
        restarted = group_starts(output)[1]
        wait_for(lambda: output.has(f"epoch {restarted + 1}/") or process.poll() is not None,
                 what="an epoch of the restarted group")
        kill_driver(process)
    finally:
        if process.poll() is None:  # the test failed midway
            kill_driver(process)
        shutil.rmtree(ray_temp, ignore_errors=True)
    # the restarted group resumed from a checkpoint, never from the start
    assert group_starts(output)[0] == 0 and restarted >= 1, output.text()[-3000:]
    epochs = sorted(json.loads(p.read_text())["epoch"] for p in ray_checkpoints(tmp_path, "run"))
    newest = max(ray_checkpoints(tmp_path, "run"), key=lambda p: json.loads(p.read_text())["epoch"])
    data = (newest.parent / "checkpoint.pt").read_bytes()
    (newest.parent / "checkpoint.pt").write_bytes(data[: len(data) // 2])  # a half-written file
    done = run_train(tmp_path, "run", *RUN)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = summary_of(tmp_path, "run")
    assert summary["start_epochs"][0] == epochs[-2]  # the older, intact checkpoint
    assert summary["epochs"] == EPOCHS
    assert abs(summary["metrics"]["acc"] - uninterrupted["metrics"]["acc"]) <= 0.05
    again = run_train(tmp_path, "run", *RUN)  # finished: not retrained
    assert again.returncode == 0 and "already finished" in again.stdout
    runs = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_runs(
        [summary["mlflow"]["experiment_id"]])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # resumed into the same run


def group_starts(output: Output) -> list[int]:
    """The epoch each start of the worker group resumed at, as rank 0 printed it."""
    printed = output.text(wait=False)
    return [int(epoch) for epoch in re.findall(r"training on 2 workers from epoch (\d+)", printed)]


def kill_driver(process: subprocess.Popen) -> None:
    """SIGKILL the driver, everything it started in its session, and its workers wherever Ray put
    them."""
    workers = own_ray_workers(process.pid)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_truncated_checkpoint_is_passed_over_for_the_previous_one(tmp_path):
    for epoch in (1, 2):
        (tmp_path / f"c{epoch}").mkdir()
        save_checkpoint({"epoch": epoch, "weights": torch.arange(1000.0)}, tmp_path / f"c{epoch}")
    newest = tmp_path / "c2" / "checkpoint.pt"
    newest.write_bytes(newest.read_bytes()[:500])
    warnings = []
    state, folder = newest_valid_checkpoint([tmp_path / "c1", tmp_path / "c2"], warn=warnings.append)
    assert state["epoch"] == 1 and folder == tmp_path / "c1"
    assert len(warnings) == 1 and "c2" in warnings[0]

"""Surviving failures on real processes: a killed Ray worker, a killed driver, damaged
checkpoints, a diverging loss, cluster collapse, and an MLflow server that is closed or lost."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from recorder import Recorder
from servers import free_port, start_mlflow_server, stop_server, wait_for

from distcluster.build import WorkerContext
from distcluster.checkpoint import newest_valid_checkpoint, save_checkpoint
from distcluster.config import from_dict, load_recipe
from distcluster.data import load_source
from distcluster.loop import train_loop

pytestmark = pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`

EPOCHS = 8
RUN = ["--epochs", str(EPOCHS), "--batch-size", "128", "--set", "max_samples=512", "--seed", "3"]


def train_argv(folder: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "distcluster.train", *RUN, "--output", str(folder / name),
            "--run-name", name, "--tracking-uri", f"sqlite:///{folder}/mlflow.db", *extra]


def run_train(folder: Path, name: str, *extra: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(train_argv(folder, name, *extra), capture_output=True, text=True, cwd=folder,
                          timeout=600, env={**os.environ, **(env or {})})


def summary_of(folder: Path, name: str) -> dict:
    return json.loads((folder / name / "summary.json").read_text())


def ray_checkpoints(folder: Path, name: str) -> list[Path]:
    return sorted((folder / name / "ray").glob(f"{name}/checkpoint_*/checkpoint.json"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("baseline")
    done = run_train(folder, "baseline")
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


def test_sigkilled_ray_worker_is_restarted_and_the_run_finishes(tmp_path, uninterrupted):
    process = subprocess.Popen(train_argv(tmp_path, "killed"), cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    # a checkpoint counts once every rank has reported it: the second one's arrival proves the first
    wait_for(lambda: len(ray_checkpoints(tmp_path, "killed")) >= 2 or process.poll() is not None,
             what="a committed checkpoint")
    pids = own_ray_workers(process.pid)
    assert pids, "no Ray Train worker process found under the driver"
    os.kill(pids[-1], signal.SIGKILL)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    summary = summary_of(tmp_path, "killed")
    assert summary["restarts"] >= 1 and summary["epochs"] == EPOCHS
    first, *resumed = summary["start_epochs"]
    assert first == 0 and all(epoch >= 1 for epoch in resumed)  # never back past a checkpoint
    assert abs(summary["metrics"]["acc"] - uninterrupted["metrics"]["acc"]) <= 0.05


def test_killed_driver_resumes_from_its_checkpoint_and_skips_a_truncated_one(tmp_path, uninterrupted):
    process = subprocess.Popen(train_argv(tmp_path, "driver"), cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(lambda: len(ray_checkpoints(tmp_path, "driver")) >= 2 or process.poll() is not None,
             what="two checkpoints")
    workers = own_ray_workers(process.pid)
    os.killpg(process.pid, signal.SIGKILL)  # the driver and everything it started in its session
    process.wait()
    for pid in workers:  # and its workers, wherever Ray put them
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    epochs = sorted(json.loads(p.read_text())["epoch"] for p in ray_checkpoints(tmp_path, "driver"))
    newest = max(ray_checkpoints(tmp_path, "driver"), key=lambda p: json.loads(p.read_text())["epoch"])
    data = (newest.parent / "checkpoint.pt").read_bytes()
    (newest.parent / "checkpoint.pt").write_bytes(data[: len(data) // 2])  # a half-written file
    done = run_train(tmp_path, "driver")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = summary_of(tmp_path, "driver")
    assert summary["start_epochs"][0] == epochs[-2]  # the older, intact checkpoint
    assert summary["epochs"] == EPOCHS
    assert abs(summary["metrics"]["acc"] - uninterrupted["metrics"]["acc"]) <= 0.05
    again = run_train(tmp_path, "driver")  # finished: not retrained
    assert again.returncode == 0 and "already finished" in again.stdout
    runs = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_runs(
        [summary["mlflow"]["experiment_id"]])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # resumed into the same run


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


# ---- guards ----------------------------------------------------------------------------------


# In-process the host checks every step; on 2 workers every 4th, the skip itself done on the device.
GUARDS = [("0", "1"), ("2", "4")]


@pytest.mark.parametrize("workers, check_every", GUARDS)
def test_a_few_non_finite_losses_are_skipped_and_training_goes_on(tmp_path, workers, check_every):
    done = run_train(tmp_path, "nan", "--workers", workers, "--epochs", "3", "--set", "max_bad_steps=5",
                     "--set", f"speed.check_every={check_every}", env={"DISTCLUSTER_TEST_NAN_STEPS": "2,3,4"})
    assert done.returncode == 0, done.stderr[-2000:]
    summary = summary_of(tmp_path, "nan")
    history = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(
        summary["mlflow"]["run_id"], "train/skipped_steps")
    assert sum(m.value for m in history) == 3 and summary["epochs"] == 3  # 12 steps, 3 skipped


@pytest.mark.parametrize("workers, check_every", GUARDS)
def test_a_diverging_loss_ends_the_run_with_exit_1_and_keeps_the_last_good_checkpoint(tmp_path, workers,
                                                                                     check_every):
    steps = ",".join(str(s) for s in range(9, 200))  # from the 3rd epoch (4 steps per epoch) on
    done = run_train(tmp_path, "diverged", "--workers", workers, "--set", "max_bad_steps=3",
                     "--set", f"speed.check_every={check_every}", env={"DISTCLUSTER_TEST_NAN_STEPS": steps})
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


def test_cluster_collapse_is_flagged_after_warm_up():
    values = {**load_recipe("digits-imc-swav"), "epochs": 3, "batch_size": 128,
              "collapse_threshold": 0.05, "collapse_after_epochs": 1}
    recorder, lines = Recorder(), []
    train_loop(from_dict(values), load_source("digits", 256), WorkerContext(), recorder, log=lines.append)
    assert [m["eval/collapsed"] for m in recorder.epochs] == [0.0, 1.0, 1.0]
    assert sum("warning: cluster collapse" in line for line in lines) == 2


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


def test_mlflow_lost_mid_run_warns_and_training_finishes(tmp_path):
    server, uri = start_mlflow_server(tmp_path)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "distcluster.train", *RUN, "--workers", "0", "--epochs", "10",
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
    assert summary["mlflow"]["lost"] and summary["epochs"] == 10


def test_ctrl_c_with_ray_workers_is_an_interruption_like_in_process(tmp_path):
    """SIGINT to the driver of a Ray run: one 'interrupted' line, exit 130, the MLflow run KILLED
    (not FAILED), and the same command resumes it."""
    process = subprocess.Popen(train_argv(tmp_path, "ctrl-c", "--workers", "1"), cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: len(ray_checkpoints(tmp_path, "ctrl-c")) >= 1 or process.poll() is not None,
             what="a checkpoint")
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == "distcluster.train: interrupted"
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("distcluster").experiment_id])[0]
    assert run.info.status == "KILLED"
    assert not (tmp_path / "ctrl-c" / "summary.json").exists()

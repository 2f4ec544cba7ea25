"""Surviving failures on real processes, bit for bit: a killed driver, a killed worker, a clean stop
continued, and damaged checkpoints (a dead node: test_elastic)."""

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from servers import wait_for
from training_runs import (
    EPOCHS,
    PACED,
    RUN,
    Output,
    assert_one_line_per_event,
    assert_same_training,
    kill_driver,
    ray_checkpoints,
    ray_lines,
    run_train,
    summary_of,
    train_command,
    wait_while_running,
    worker_pid,
)

from distcluster.engine.checkpoint import (
    CorruptCheckpoint,
    newest_valid_checkpoint,
    save_checkpoint,
    verified_checkpoint,
)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, ray_cluster) -> dict:
    """The 2-worker run with nothing stopped: what every stopped and resumed run below must
    equal bit for bit (its final checkpoint, and its summary); and what it printed."""
    folder = tmp_path_factory.mktemp("baseline")
    done = run_train(folder, "baseline", *RUN, env=ray_cluster.env)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"state": verified_checkpoint(folder / "baseline" / "checkpoint"),
            "summary": summary_of(folder, "baseline"), "run": done}


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_a_run_joining_a_cluster_prints_each_line_once_and_its_summary_last(uninterrupted):
    """RAY_ADDRESS set, as a user of a running cluster: the workers' lines on stdout, once each,
    and nothing of Ray's own on either stream."""
    done = uninterrupted["run"]
    assert_one_line_per_event(done.stdout, EPOCHS, workers=2)
    assert not ray_lines(done.stderr), done.stderr[-3000:]


def assert_equals_uninterrupted(folder: Path, name: str, uninterrupted: dict) -> dict:
    """The run's final state and scores equal the uninterrupted run's; its summary."""
    assert_same_training(verified_checkpoint(folder / name / "checkpoint"), uninterrupted["state"])
    summary = summary_of(folder, name)
    assert summary["metrics"] == uninterrupted["summary"]["metrics"]
    return summary


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_a_killed_driver_resumes_from_the_newest_checkpoint_that_verifies(
        tmp_path, uninterrupted, ray_cluster):
    """A 2-worker run on the session's Ray head whose driver is SIGKILLed midway (Ray then ends its
    job's actors) and whose newest checkpoint is left half-written: the same command resumes from
    the newest checkpoint that verifies, into the same MLflow run."""
    process = subprocess.Popen(train_command(tmp_path, "run", *RUN), cwd=tmp_path, text=True,
                               env={**os.environ, **ray_cluster.env, **PACED},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    output = Output(process)
    try:
        # a checkpoint counts once every rank has reported it: the second one's arrival proves the first
        wait_while_running(process, lambda: len(intact_checkpoints(tmp_path)) >= 2, "two checkpoints", output)
        assert ray_cluster.train_processes(), "no Ray Train process found to wait for"
    finally:
        kill_driver(process)
    # Ray ends the job's actors after the driver: until they are gone a worker may still commit a
    # checkpoint (or the controller delete one), so the checkpoints are listed after that.
    wait_for(lambda: not ray_cluster.train_processes(), what="the killed run's Ray Train processes to end")
    intact = intact_checkpoints(tmp_path)
    newest = intact[max(intact)] / "checkpoint.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a half-written file
    done = run_train(tmp_path, "run", *RUN, env=ray_cluster.env)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = summary_of(tmp_path, "run")
    resumed = sorted(intact)[-2]  # the older, intact checkpoint
    assert summary["start_epochs"] == [resumed] and resumed >= 1
    assert summary["epochs"] == EPOCHS
    assert_equals_uninterrupted(tmp_path, "run", uninterrupted)
    again = run_train(tmp_path, "run", *RUN)  # finished: not retrained
    assert again.returncode == 0 and "already finished" in again.stdout
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([summary["mlflow"]["experiment_id"]])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # resumed into the same run
    logged = client.get_metric_history(runs[0].info.run_id, "train/workers")  # at each group start
    assert [m.step for m in sorted(logged, key=lambda m: m.timestamp)] == [0, resumed]


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_a_killed_worker_of_two_resumes_to_the_uninterrupted_runs_state_bit_for_bit(
        tmp_path, uninterrupted, ray_cluster):
    """Both workers wait once epoch 4's checkpoint is written (a test hook); one is SIGKILLed; Ray
    restarts the group, which resumes from that checkpoint and ends where the uninterrupted run did."""
    paused = {**os.environ, **ray_cluster.env, "DISTCLUSTER_TEST_PAUSE_AFTER_EPOCH": "4"}
    process = subprocess.Popen(train_command(tmp_path, "run", *RUN), cwd=tmp_path, text=True, env=paused,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    output = Output(process)
    try:
        wait_while_running(process, lambda: 4 in intact_checkpoints(tmp_path), "epoch 4's checkpoint", output)
        os.kill(worker_pid(output), signal.SIGKILL)
        assert process.wait(timeout=600) == 0, output.text()[-3000:]
    finally:
        kill_driver(process)
    summary = assert_equals_uninterrupted(tmp_path, "run", uninterrupted)
    assert summary["start_epochs"] == [0, 4] and summary["restarts"] == 1


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_a_finished_run_given_more_epochs_continues_to_the_uninterrupted_runs_state(
        tmp_path, uninterrupted, ray_cluster):
    """A clean stop: the run ends at epoch 4; the same command with --epochs 8 goes on from there."""
    half = [*RUN, "--epochs", str(EPOCHS // 2)]
    for args in (half, RUN):
        done = run_train(tmp_path, "run", *args, env=ray_cluster.env)
        assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming at epoch {EPOCHS // 2} with changed settings (applied): epochs" in done.stdout
    summary = assert_equals_uninterrupted(tmp_path, "run", uninterrupted)
    assert summary["start_epochs"] == [EPOCHS // 2]


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_a_run_goes_on_from_its_newest_checkpoint_when_it_switches_between_in_process_and_ray(
        tmp_path, ray_cluster):
    """In-process for 2 epochs, 2 Ray workers to 4, in-process again to 5: each invocation
    starts where the last one's checkpoints end, in the same MLflow run, every epoch once."""
    for workers, epochs, start in (("0", 2, 0), ("2", 4, 2), ("0", 5, 4)):
        done = run_train(tmp_path, "run", *RUN, "--workers", workers, "--epochs", str(epochs),
                         env=ray_cluster.env)
        assert done.returncode == 0, done.stderr[-3000:]
        summary = summary_of(tmp_path, "run")
        assert (summary["epochs"], summary["start_epochs"]) == (epochs, [start]), done.stdout[-2000:]
    lrs = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(summary["mlflow"]["run_id"],
                                                                           "train/lr")
    assert sorted(m.step for m in lrs) == [1, 2, 3, 4, 5]


def intact_checkpoints(folder: Path) -> dict[int, Path]:
    """{epoch: folder} of the run's committed checkpoints that verify (Ray may be copying one)."""
    intact = {}
    for meta in ray_checkpoints(folder, "run"):
        with contextlib.suppress(CorruptCheckpoint):
            intact[verified_checkpoint(meta.parent)["epoch"]] = meta.parent
    return intact


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

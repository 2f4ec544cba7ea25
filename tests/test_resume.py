"""Resuming (issue 30): the checkpoint's config is compared with the new one, a resumed run equals
the uninterrupted one bit for bit, and every rank resumes from the checkpoint rank 0 chose."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from commands import refused
from mlflow.tracking import MlflowClient
from servers import wait_for
from training_runs import assert_same_training

from distcluster import config
from distcluster.commands import train
from distcluster.common.errors import ConfigError
from distcluster.common.files import file_sha256
from distcluster.engine.checkpoint import (
    CorruptCheckpoint,
    agreed_resume_state,
    save_checkpoint,
    verified_checkpoint,
)
from distcluster.tracking.registry import fetch_model

# digits, 4 steps an epoch, a small network: about a second an epoch in-process
SMALL = ["--workers", "0", "--batch-size", "128", "--seed", "5", "--set", "max_samples=512",
         "--set", "model.width=8", "--set", "eval_every=1", "--set", "precision=fp32"]


def argv(folder: Path, name: str, *extra: str) -> list[str]:
    return [*SMALL, *extra, "--output", str(folder / name), "--run-name", name,
            "--tracking-uri", f"sqlite:///{folder}/mlflow.db"]


def final_state(folder: Path, name: str) -> dict:
    return verified_checkpoint(folder / name / "checkpoint")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("straight")
    assert train.main(argv(folder, "straight", "--epochs", "4")) == 0
    return final_state(folder, "straight")


def test_a_run_stopped_cleanly_and_continued_equals_the_uninterrupted_one(tmp_path, uninterrupted):
    assert train.main(argv(tmp_path, "run", "--epochs", "2")) == 0  # finished at 2 epochs
    assert train.main(argv(tmp_path, "run", "--epochs", "4")) == 0  # more epochs: it goes on
    assert_same_training(final_state(tmp_path, "run"), uninterrupted)


def test_a_version_keeps_its_model_when_the_run_goes_on_and_a_finished_run_can_still_be_registered(
        tmp_path, capsys):
    weights = tmp_path / "run" / "model" / "artifacts" / "model" / "weights.safetensors"
    assert train.main(argv(tmp_path, "run", "--epochs", "1", "--register", "m")) == 0
    after_one = file_sha256(weights)
    assert train.main(argv(tmp_path, "run", "--epochs", "2")) == 0  # goes on, registers nothing
    assert train.main(argv(tmp_path, "run", "--epochs", "2", "--register", "m")) == 0  # finished
    assert "registered models:/m/2" in capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["mlflow"]["registered_model"], summary["mlflow"]["version"]) == ("m", "2")
    assert after_one != file_sha256(weights)
    for version, expected in (("1", after_one), ("2", file_sha256(weights))):
        folder, scratch = fetch_model(f"models:/m/{version}", f"sqlite:///{tmp_path}/mlflow.db",
                                      progress=False)
        assert file_sha256(folder / "artifacts" / "model" / "weights.safetensors") == expected, version
        scratch.cleanup()


def test_a_killed_run_resumed_equals_the_uninterrupted_one(tmp_path, uninterrupted):
    """SIGKILL of the training process once its second checkpoint is on disk."""
    command = [sys.executable, "-m", "distcluster.train", *argv(tmp_path, "run", "--epochs", "4")]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True,
                               env={**os.environ, "DISTCLUSTER_TEST_PAUSE_AFTER_EPOCH": "2",
                                    # this process's thread count: the sums then add up in one order
                                    "OMP_NUM_THREADS": str(torch.get_num_threads())})
    try:
        second = tmp_path / "run" / "checkpoints" / "epoch-00002"
        wait_for(lambda: _intact(second) or process.poll() is not None, what="the second checkpoint")
        assert process.poll() is None, process.stderr.read()[-3000:]
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not (tmp_path / "run" / "summary.json").exists()
    assert train.main(argv(tmp_path, "run", "--epochs", "4")) == 0
    assert_same_training(final_state(tmp_path, "run"), uninterrupted)


def _intact(folder: Path) -> bool:
    try:
        return verified_checkpoint(folder)["epoch"] == 2
    except CorruptCheckpoint:
        return False


@pytest.mark.parametrize("change, key", [
    (["--clusters", "12"], "clusters"),
    (["--objective", "iic"], "objective"),
    (["--set", "model.width=16"], "model.width"),
    (["--set", "imc_swav.temperature=0.2"], "imc_swav.temperature"),
    (["--set", "prior=estimated"], "prior"),
    (["--set", "optim.name=sgd"], "optim.name"),
    (["--epochs", "1"], "epochs"),
])
def test_a_change_the_checkpoint_cannot_take_is_refused_in_one_line_naming_it(tmp_path, capsys, change, key):
    assert train.main(argv(tmp_path, "run", "--epochs", "2")) == 0
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    capsys.readouterr()
    err = refused(train, argv(tmp_path, "run", "--epochs", "3", *change), capsys)
    assert f"config key '{key}'" in err
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before


def test_a_changed_learning_rate_is_applied_and_recorded(tmp_path, capsys):
    assert train.main(argv(tmp_path, "run", "--epochs", "2", "--set", "optim.lr=0.001")) == 0
    capsys.readouterr()
    assert train.main(argv(tmp_path, "run", "--epochs", "3", "--set", "optim.lr=0.0002")) == 0
    said = capsys.readouterr().out
    changes = "epochs 2 -> 3, optim.lr 0.001 -> 0.0002"
    assert f"resuming at epoch 2 with changed settings (applied): {changes}" in said
    state = final_state(tmp_path, "run")
    assert [g["lr"] for g in state["optimizer"]["param_groups"]] == [0.0002, 0.0002]
    assert [epoch["train/lr"] for epoch in state["history"]] == [0.001, 0.001, 0.0002]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("distcluster").experiment_id])[0]
    assert run.data.tags["resumed_at_epoch_2"] == changes
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train/lr")] == [0.001, 0.001, 0.0002]


def test_the_config_comparison_allows_what_is_safe_and_names_what_is_not():
    saved = config.from_dict({**config.load_recipe("digits-imc-swav"), "epochs": 4})
    safe = config.from_dict({**saved.to_dict(), "epochs": 9, "workers": 3, "tracking_uri": "http://x:5000",
                             "optim": {**saved.to_dict()["optim"], "lr": 0.5, "milestones": [6]}})
    changes = config.resume_changes(saved.to_dict(), safe, trained_epochs=4).changed
    assert changes == {"epochs": (4, 9), "workers": (2, 3), "tracking_uri": ("", "http://x:5000"),
                       "optim.lr": (saved.optim.lr, 0.5), "optim.milestones": ([], [6])}
    assert config.resume_changes(saved.to_dict(), saved, trained_epochs=4).changed == {}
    with pytest.raises(ConfigError, match="'model.backbone'"):
        config.resume_changes(saved.to_dict(), config.from_dict({**saved.to_dict(), "model": {
            "backbone": "resnet18"}}), trained_epochs=4)


def test_a_checkpoint_from_before_model_stages_and_pool_counts_as_two_stages_and_a_2x2_grid():
    current = config.from_dict(config.load_recipe("digits-crlc"))
    older = current.to_dict()
    del older["model"]["stages"], older["model"]["sobel"], older["model"]["pool"]  # written before the keys
    assert config.resume_changes(older, current, trained_epochs=1).changed == {}
    deeper = config.from_dict({**current.to_dict(), "model": {**current.to_dict()["model"], "stages": 3}})
    with pytest.raises(ConfigError, match="'model.stages'.*trained with 2"):
        config.resume_changes(older, deeper, trained_epochs=1)
    pooled = config.from_dict({**current.to_dict(), "model": {**current.to_dict()["model"], "pool": 1}})
    with pytest.raises(ConfigError, match="'model.pool'.*trained with 2"):
        config.resume_changes(older, pooled, trained_epochs=1)


def _agree(rank: int, world: int, init_file: str, folder: str) -> None:
    """Rank 0 sees checkpoints of epochs 1 and 2; rank 1 sees one of epoch 3 (or none) that it
    would pick if it chose for itself. Each writes what it resumes from."""
    from distcluster.engine.checkpoint import newest_valid_checkpoint

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world)
    try:
        root = Path(folder)
        sees = {0: [root / "c1", root / "c2"], 1: [root / "c3"]}[rank]
        state = agreed_resume_state(lambda: newest_valid_checkpoint(sees)[0])
        torch.save(state, root / f"rank{rank}.pt")
        torch.distributed.barrier()  # neither rank tears the group down while the other still uses it
    finally:
        torch.distributed.destroy_process_group()


def test_every_rank_resumes_from_the_checkpoint_rank_0_chose_whatever_files_it_sees(tmp_path):
    for epoch in (1, 2, 3):
        (tmp_path / f"c{epoch}").mkdir()
        save_checkpoint({"epoch": epoch, "weights": torch.full((5,), float(epoch))}, tmp_path / f"c{epoch}")
    mp.spawn(_agree, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for state in states:
        assert state["epoch"] == 2 and torch.equal(state["weights"], torch.full((5,), 2.0))

"""`python -m distcluster.tune`: search spaces checked before anything starts, and a real
sweep on local Ray with ASHA, MLflow parent/child runs on a real `mlflow server`, and the
champion model served by `predict`."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from logged_model import assert_logged_model
from mlflow.tracking import MlflowClient
from servers import RAY, mlflow_server, wait_for

from distcluster.cluster.search_space import load_space, space_names
from distcluster.cluster.sweep import Sample, Sweep, TrialRecord, choose_clusters, param_space
from distcluster.commands.tune import main as tune_main
from distcluster.common.errors import UserError
from distcluster.data.arrays import ArraySource, subset_indices
from distcluster.data.images import digits_arrays

NAME = "digits-sweep"
PACKAGED = {"digits-smoke", "digits-imc-swav", "digits-choose-k", "cifar10-imc-swav", "cifar10-iic",
            "cifar10-crlc", "cifar10-cpu-choose-k", "cifar10-cpu"}


def tune(*argv: str, cwd, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distcluster.tune", *argv], capture_output=True, text=True,
                          cwd=cwd, timeout=900, env={**os.environ, **(env or {})})


def test_every_packaged_space_loads_and_its_extremes_validate():
    assert PACKAGED <= set(space_names())
    for name in PACKAGED:
        space = load_space(name)
        assert space.dimensions
        for cfg in space.extreme_configs():
            cfg.validate()


def test_a_space_draws_typed_values_into_a_full_config(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: digits-crlc\nset: {epochs: 3}\nsweep: {samples: 3}\nspace:\n"
                    "  crlc.temperature: {uniform: [0.1, 0.5]}\n  augment.crops.0.size: {choice: [6, 8]}\n")
    space = load_space(str(path))
    cfg = space.trial_config({"crlc.temperature": 0.25, "augment.crops.0.size": 6})
    drawn = (cfg.objective, cfg.epochs, cfg.crlc.temperature, cfg.augment.crops[0].size)
    assert drawn == ("crlc", 3, 0.25, 6)
    assert space.sweep.samples == 3 and space.sweep.grace_period == 2  # the rest defaults


def test_the_smoke_grid_runs_a_learning_trial_before_each_stalled_one():
    from ray.tune.search.variant_generator import generate_variants

    order = [(config["optim.lr"], config["seed"]) for _, config in generate_variants(
        param_space(load_space("digits-smoke")))]
    assert order == [(1e-3, 0), (1e-6, 0), (1e-3, 1), (1e-6, 1)]  # what its ASHA rung relies on


def finished_trials(folder, partitions: dict[str, tuple[dict, np.ndarray]]) -> list[TrialRecord]:
    """Records of finished trials whose clusters of the consensus images are `partitions`."""
    records = []
    for trial_id, (config, clusters) in partitions.items():
        (folder / "trials" / trial_id / "consensus").mkdir(parents=True)
        np.save(folder / "trials" / trial_id / "consensus" / "clusters.npy", clusters)
        records.append(TrialRecord(trial_id, config, "completed", 12, 0.5, None, None, None))
    return records


def test_a_choose_k_space_recommends_the_k_whose_seeds_agree_and_other_spaces_none(tmp_path):
    groups = np.repeat(np.arange(10), 200)
    rng = np.random.default_rng(1)
    runs = {f"k10-s{seed}": ({"clusters": 10, "seed": seed}, (groups + seed) % 10) for seed in range(3)}
    # 12 clusters: two of the ten groups split in two, differently by each seed
    runs |= {f"k12-s{seed}": ({"clusters": 12, "seed": seed},
                              np.where(groups < 2, groups + 10 * rng.integers(0, 2, 2000), groups))
             for seed in range(3)}
    runs["k14-s0"] = ({"clusters": 14, "seed": 0}, groups)  # one seed only: no stability
    records = finished_trials(tmp_path, runs)
    records.append(TrialRecord("k8-failed", {"clusters": 8, "seed": 0}, "failed", 3, None, None, None, None))
    sweep = Sweep(load_space("digits-choose-k"), "digits", "eval/acc", "", "", "", str(tmp_path), 1.0,
                  np.zeros((1, 8, 8, 1), np.uint8))
    choice = choose_clusters(records, sweep)
    assert choice["k"] == 10 and choice["stability"]["10"] == 1.0 and choice["stability"]["12"] < 0.95
    assert set(choice["stability"]) == {"10", "12"} and choice["runs"] == {"10": 3, "12": 3}
    sweep.space = load_space("digits-smoke")  # searches the learning rate too: no recommendation
    assert choose_clusters(records, sweep) is None


BAD_SPACES = {
    "unknown-key": ("space: {imc_swav.temprature: {choice: [0.1]}}", "'imc_swav.temprature'.*unknown"),
    "unknown-set-key": ("set: {epoch: 3}\nspace: {clusters: {choice: [10]}}", "'epoch'.*unknown config key"),
    "list-index": ("space: {augment.crops.4.size: {choice: [8]}}", "no item 4 in a list of 2"),
    "empty-choice": ("space: {clusters: {choice: []}}", "'clusters'.*non-empty list"),
    "reversed-range": ("space: {optim.lr: {uniform: [0.1, 0.01]}}", "'optim.lr'.*low < high"),
    "log-of-zero": ("space: {optim.lr: {loguniform: [0, 0.01]}}", "'optim.lr'.*low > 0"),
    "float-randint": ("space: {seed: {randint: [0, 2.5]}}", "'seed'.*integer ends"),
    "fractions-for-an-integer": ("space: {clusters: {uniform: [8, 12]}}", "'clusters'.*fractions.*randint"),
    "exponent-form-range": ("space: {optim.lr: {loguniform: [1e-4, 1e-2]}}\nsweep: {samples: 0}", "samples"),
    "unknown-kind": ("space: {clusters: {normal: [10, 2]}}", "'clusters'.*must be one of"),
    "impossible-value": ("space: {clusters: {choice: [1, 10]}}", "'clusters'.*K must be in \\[2"),
    "impossible-end": ("space: {imc_swav.temperature: {uniform: [-0.1, 0.3]}}", "'imc_swav.temperature'"),
    "unknown-section": ("spaces: {clusters: {choice: [10]}}", "'spaces'.*unknown section"),
    "nothing-searched": ("base: digits-iic", "'space'.*no keys"),
    "unknown-setting": ("space: {clusters: {choice: [10]}}\nsweep: {trials: 4}", "'sweep.trials'.*unknown"),
    "no-samples": ("space: {clusters: {choice: [10]}}\nsweep: {samples: 0}", "'samples'.*>= 1"),
    "optuna-grid": ("space: {clusters: {grid_search: [10]}}\nsweep: {search: optuna}", "optuna cannot"),
    "unknown-recipe": ("base: digits-kmeans\nspace: {clusters: {choice: [10]}}", "digits-kmeans"),
    "not-yaml": ("space: {clusters: [", "invalid YAML"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPACES))
def test_a_bad_space_is_one_user_error_naming_the_key(case, tmp_path):
    text, message = BAD_SPACES[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_space(str(path))


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_a_typo_exits_2_with_one_line_before_ray_or_mlflow_start(tmp_path):
    (tmp_path / "typo.yaml").write_text("base: digits-imc-swav\nspace: {clusterz: {choice: [8, 10]}}\n")
    done = tune("--space", "typo.yaml", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == ("distcluster.tune: error: tune space typo: config key 'clusterz': "
                                   "unknown config key (got 8)")
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv, needle", [
    (["--space", "no-such-space"], "unknown tune space 'no-such-space'"),
    (["--space", "digits-smoke", "--samples", "0"], "'samples' must be an integer >= 1"),
    (["--space", "digits-smoke", "--set", "epochz=3"], "'epochz': unknown config key"),
    (["--space", "digits-smoke", "--register", "a:b"], "config key 'register'"),
    (["--space", "digits-smoke", "--register", "a@b"], "config key 'register'"),
])
@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_other_mistakes_exit_2_with_one_line_and_leave_nothing(argv, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # in-process: the subprocess above shows the real command's exit
    assert tune_main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert needle in error and len(error.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("existing, output, needle", [
    ("out", "out", "is a file"),
    ("out", "out/sweep", "out is not a writable folder"),
    ("out/notes.txt", "out", "is not empty"),
])
@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_an_output_that_is_or_is_under_a_file_or_holds_other_files_is_refused_and_kept(
        existing, output, needle, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / existing
    mine.parent.mkdir(exist_ok=True)
    mine.write_text("mine")
    assert tune_main(["--space", "digits-smoke", "--output", str(tmp_path / output)]) == 2
    error = capsys.readouterr().err.strip()
    assert needle in error and len(error.splitlines()) == 1
    assert mine.read_text() == "mine" and not (tmp_path / "out" / "ray").exists()


@pytest.mark.parametrize("held_out, needle", [
    ({"x": np.zeros((20, 8, 8), np.uint8)}, "has no labels: it scores trials by ACC"),
    ({"x": np.random.default_rng(0).integers(0, 255, (20, 8, 8, 3), np.uint8), "y": np.zeros(20, np.int64)},
     "has 3-channel images, the training data 1-channel ones"),
])
def test_eval_data_that_cannot_score_trials_exits_2_before_anything_starts(held_out, needle, tmp_path,
                                                                          monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "held-out.npz", **held_out)
    assert tune_main(["--space", "digits-smoke", "--eval-data", "held-out.npz"]) == 2
    error = capsys.readouterr().err.strip()
    assert needle in error and len(error.splitlines()) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["held-out.npz"]


def test_a_drawn_sample_holds_the_chosen_images_with_their_labels():
    images, labels = digits_arrays()
    sample = Sample.draw(ArraySource.from_hwc(images, labels, "digits"), 50, seed=3)
    rows = [int(np.flatnonzero((images == image).all(axis=(1, 2, 3)))[0]) for image in sample.images]
    assert len(set(rows)) == 50 and rows == sorted(rows)  # distinct images, in the source's order
    assert list(sample.labels) == list(labels[rows])
    assert np.array_equal(Sample.draw(ArraySource.from_hwc(images, labels, "digits"), 50, seed=3).images,
                          sample.images)  # the same draw for the same seed


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, ray_cluster):
    folder = tmp_path_factory.mktemp("tune")
    held_out = write_held_out_digits(folder / "held-out.npz")
    with mlflow_server(folder) as uri:
        done = tune("--space", "digits-smoke", "--register", NAME, "--tracking-uri", uri,
                    "--eval-data", held_out, "--output", str(folder / "out"), cwd=folder, env=ray_cluster.env)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        yield folder, uri, json.loads((folder / "out" / "tune_summary.json").read_text()), done


def write_held_out_digits(path) -> str:
    """The 797 digits digits-smoke does not train on (it keeps 1,000: max_samples)."""
    images, labels = digits_arrays()
    rest = np.setdiff1d(np.arange(len(images)), subset_indices(len(images), 1000))
    np.savez(path, x=images[rest], y=labels[rest])
    return str(path)


def reserved_placement_groups(ray_cluster) -> list[dict]:
    done = subprocess.run([RAY, "list", "placement-groups", "--filter", "state=CREATED", "--format", "json"],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **ray_cluster.env})
    assert done.returncode == 0, done.stderr[-2000:]
    return [] if done.stdout.startswith("No resource") else json.loads(done.stdout)  # Ray's words for none


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_the_ended_sweep_leaves_no_resources_reserved_on_the_cluster(sweep, ray_cluster):
    assert reserved_placement_groups(ray_cluster) == []  # the next job gets every CPU


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_ctrl_c_after_a_trial_ended_ends_the_sweep_as_interrupted_not_finished(tmp_path, ray_cluster):
    """Tune takes Ctrl-C itself and returns the trials that had ended: the sweep must not pass for
    a finished one (exit 0 and a summary of the one trial) but end as interrupted, exit 130, with
    no summary and its parent MLflow run KILLED."""
    out, store = tmp_path / "out", f"sqlite:///{tmp_path}/mlflow.db"
    command = [sys.executable, "-m", "distcluster.tune", "--space", "digits-smoke", "--set", "epochs=1",
               "--output", str(out), "--tracking-uri", store]
    process = subprocess.Popen(command, cwd=tmp_path, text=True, env={**os.environ, **ray_cluster.env},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:  # a trial's last file: its clusters of the consensus images
        wait_for(lambda: process.poll() is not None or any(out.glob("trials/*/consensus/clusters.npy")),
                 what="the first trial to end")
        assert process.poll() is None, process.communicate()[1][-3000:]
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == "distcluster.tune: interrupted" and stdout == ""
    assert not (out / "tune_summary.json").exists()
    client = MlflowClient(store)
    runs = client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
    assert [run.info.status for run in runs if "mlflow.parentRunId" not in run.data.tags] == ["KILLED"]


RELEASE = """
import ray
from ray.util.placement_group import placement_group
from ray.util.state import list_placement_groups
from distcluster.cluster.ray_train import init_ray, release_placement_groups
init_ray()
ray.get(placement_group([{"CPU": 0.25}]).ready())  # as a stopped trial's worker group: still reserved
released = release_placement_groups()
job = ray.get_runtime_context().get_job_id()
left = list_placement_groups(filters=[("creator_job_id", "=", job), ("state", "=", "CREATED")])
print(released, len(left))
"""


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_release_removes_what_the_job_still_reserves_while_it_runs(ray_cluster):
    done = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **ray_cluster.env})
    assert done.returncode == 0 and done.stdout.split()[-2:] == ["1", "0"], done.stderr[-2000:]


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_four_trials_one_stopped_early_by_asha(sweep):
    _, _, summary, done = sweep
    trials = summary["trials"]
    assert len(trials) == 4 and summary["select"] == "labels" and summary["metric"] == "held_out_acc"
    stopped = [t for t in trials if t["status"] == "stopped_early"]
    # One trial at a time in the grid's order: ASHA stops exactly the two stalled trials.
    assert sorted(t["config"]["optim.lr"] for t in stopped) == [1e-6, 1e-6]
    assert summary["stopped_early"] == 2 and all(t["epochs"] < 5 for t in stopped)
    completed = [t for t in trials if t["status"] == "completed"]
    assert [t["config"]["optim.lr"] for t in completed] == [1e-3, 1e-3]
    assert all(t["epochs"] == 5 for t in completed)
    assert {(t["config"]["optim.lr"], t["config"]["seed"]) for t in trials} == {
        (1e-3, 0), (1e-3, 1), (1e-6, 0), (1e-6, 1)}
    assert "trials" in done.stderr and "stopped early" in done.stdout  # progress bar and result line
    noise = ("RayTrainWorker", "core_worker.cc", "(raylet)")
    assert not any(line in done.stdout + done.stderr for line in noise)
    # The result alone on stdout: no banner of Tune's, the trial lines on stderr.
    first_words = [line.split()[0] for line in done.stdout.splitlines()]
    assert first_words == ["registered", "best", "without", "model:"]


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_the_best_trial_has_the_highest_held_out_acc_and_every_score_is_recorded(sweep):
    folder, uri, summary, _ = sweep
    completed = [t for t in summary["trials"] if t["status"] == "completed"]
    assert all(0 <= t["view_mi"] <= 1 and 0 < t["acc"] <= 1 and 0 < t["held_out_acc"] <= 1 for t in completed)
    assert all(0 <= t["consensus"] <= 1 for t in completed)
    assert all(t["held_out_acc"] is None for t in summary["trials"] if t["status"] != "completed")
    best = summary["best"]
    assert best["held_out_acc"] == max(t["held_out_acc"] for t in completed)
    assert best["metric"] == best["held_out_acc"]
    # The held-out score is what evaluate reports for that model on those images.
    done = subprocess.run([sys.executable, "-m", "distcluster.evaluate", "--model", best["model_uri"],
                           "--data", str(folder / "held-out.npz"), "--tracking-uri", uri, "--quiet"],
                          capture_output=True, text=True, cwd=folder, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["acc"] == pytest.approx(best["held_out_acc"], abs=1e-9)
    assert best["full_config"]["optim"]["lr"] == best["config"]["optim.lr"]
    assert best["full_config"]["seed"] == best["config"]["seed"]


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_mlflow_holds_one_parent_with_four_child_runs(sweep):
    _, uri, summary, _ = sweep
    client = MlflowClient(uri)
    parent = summary["mlflow"]["parent_run_id"]
    assert client.get_run(parent).info.status == "FINISHED"
    children = client.search_runs([summary["mlflow"]["experiment_id"]],
                                  f"tags.`mlflow.parentRunId` = '{parent}'")
    assert len(children) == 4
    by_id = {run.info.run_id: run for run in children}
    for trial in summary["trials"]:
        run = by_id[trial["run_id"]]
        assert float(run.data.params["optim.lr"]) == trial["config"]["optim.lr"]
        epochs = sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval/view_mi"))
        # A stopped trial may log one more epoch while Tune's stop reaches it.
        assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) >= trial["epochs"]
        if trial["status"] == "completed":
            assert run.info.status == "FINISHED"
            assert run.data.metrics["final/held_out_acc"] == trial["held_out_acc"]
            assert_logged_model(client, run.info.run_id)
        else:
            assert run.info.status == "KILLED" and run.data.tags["distcluster.status"] == "stopped_early"
    assert {a.path for a in client.list_artifacts(parent, "sweep")} == {
        "sweep/trials.csv", "sweep/sweep.png", "sweep/label_free_vs_acc.png"}
    quality = summary["label_free_vs_acc"]
    assert quality["acc"] == "held_out_acc" and quality["trials"] == len(quality["points"]) >= 2
    assert quality["gap"] == quality["best_acc"] - quality["picked_acc"] >= 0
    assert client.get_run(parent).data.metrics["label_free/gap"] == pytest.approx(quality["gap"])
    table = pd.read_csv(client.download_artifacts(parent, "sweep/trials.csv"))
    assert sorted(table["trial_id"]) == sorted(t["trial_id"] for t in summary["trials"])


@pytest.mark.slow  # real processes, Ray, MLflow or FFCV: `make test`, not `make test-fast`
def test_champion_alias_points_at_the_best_trial_and_predict_uses_it(sweep, tmp_path):
    folder, uri, summary, _ = sweep
    client = MlflowClient(uri)
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert champion.run_id == summary["best"]["run_id"]
    assert summary["model_uri"] == f"models:/{NAME}@champion"
    out = tmp_path / "clusters.csv"
    done = subprocess.run([sys.executable, "-m", "distcluster.predict", "--model", f"models:/{NAME}@champion",
                           "--data", "digits", "--out", str(out), "--tracking-uri", uri, "--quiet"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = pd.read_csv(out)
    assert len(table) == 1797 and table["cluster"].between(0, best_clusters(summary) - 1).all()


def best_clusters(summary) -> int:
    return summary["best"]["full_config"]["clusters"]

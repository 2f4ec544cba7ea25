"""Ray Tune sweeps: every trial is a Ray Train run driven by a Tune function.

Each trial runs a driver function that builds a `TorchTrainer` with the trial's config (its
`workers` Ray Train workers) and forwards every evaluated epoch to Tune, whose ASHA scheduler
stops the weak trials early. MLflow holds one child run per trial (params, per-epoch metrics,
model, learning curves). Finished trials are ranked by ACC or, with no labels needed, by their
consensus with the other finished trials (core.metrics.consensus, weighted by view_mi). A
sweep over the number of clusters with several seeds each recommends the K whose seeds agree
most (`choose_clusters`).
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distcluster.cluster.search_space import SearchSpace, SweepSettings
from distcluster.common.errors import RunFailed
from distcluster.common.files import write_atomic_dir, write_json_atomic
from distcluster.core.metrics import cluster_scores, consensus, recommended_clusters, stability_by_clusters
from distcluster.data.arrays import ArraySource, ImageSource
from distcluster.engine.checkpoint import newest_valid_checkpoint
from distcluster.engine.evaluation import assign_checkpoint
from distcluster.tracking.outputs import log_model_and_plots
from distcluster.tracking.runs import RunTracker

CONSENSUS_IMAGES = 2000  # images every finished model assigns, to compare the models
HELD_OUT_IMAGES = 10_000  # at most this many --eval-data images score each finished model
HELD_OUT_SCORES = "held_out.json"  # in a finished trial's folder
TRIAL_TAG = "distcluster.trial_id"
DRIVER_CPUS = 0.01
CHOOSING_CLUSTERS = {"clusters", "seed"}  # the searched keys of a space that chooses K


@dataclass
class Sweep:
    """What every trial shares; handed to the driver function through the object store."""

    space: SearchSpace
    data: str  # as sources.resolve_data returned it
    metric: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    output: str
    cpus_per_worker: float
    consensus_images: np.ndarray  # (n, H, W, C) uint8: every finished model assigns them
    held_out: Sample | None = None  # labelled images no trial trains on (tune --eval-data)


@dataclass
class Sample:
    """Images drawn once by the sweep's driver and decoded in one pass; Ray's object store hands
    them to the trials."""

    images: np.ndarray  # (n, H, W, C) uint8
    labels: np.ndarray | None  # (n,)

    @classmethod
    def draw(cls, source: ImageSource, count: int, seed: int) -> Sample:
        chosen = np.random.default_rng(seed).choice(len(source), min(len(source), count), replace=False)
        indices = np.sort(chosen)
        labels = None if source.labels is None else source.labels.numpy()[indices]
        return cls(np.ascontiguousarray(source.take(indices).permute(0, 2, 3, 1).numpy()), labels)

    def clusters(self, state: dict[str, Any], name: str) -> np.ndarray:
        """A finished trial's clusters of these images."""
        sample = ArraySource.from_hwc(self.images, None, name)
        return assign_checkpoint(state, sample).clusters.astype(np.int32)


def run_trial(sampled: dict[str, Any], sweep: Sweep) -> None:
    """Tune's driver function for one trial: a TorchTrainer run in a child MLflow run."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from distcluster.cluster import ray_train

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = sweep.space.trial_config(sampled)
    folder = Path(sweep.output) / "trials" / trial_id
    tracker = RunTracker.start(sweep.tracking_uri, sweep.experiment, f"{sweep.space.name}-{trial_id}",
                               tags={"mlflow.parentRunId": sweep.parent_run_id, TRIAL_TAG: trial_id})
    tracker.log_params(cfg.flat())
    with tracker.ending():
        run = ray_train.fit(cfg, sweep.data, {"uri": tracker.tracking_uri, "run_id": tracker.run_id},
                            folder / "ray", trial_id, callbacks=[TuneReportCallback()],
                            offered_cpus=sweep.cpus_per_worker)
        found = newest_valid_checkpoint(run.checkpoint_dirs)
        if found is None:
            raise RuntimeError(f"trial {trial_id} ended without a readable checkpoint")
        state = found[0]
        log_model_and_plots(tracker, state, folder)
        clusters = Sample(sweep.consensus_images, None).clusters(state, "consensus")
        write_atomic_dir(folder / "consensus", lambda d: np.save(d / "clusters.npy", clusters))
        if sweep.held_out is not None:
            scores = score_held_out(state, sweep.held_out)
            tracker.log_metrics({f"final/{k}": v for k, v in scores.items()}, 0)
            write_json_atomic(folder / HELD_OUT_SCORES, scores)


def score_held_out(state: dict[str, Any], held_out: Sample) -> dict[str, float]:
    """ACC, NMI and ARI of a finished trial on the held-out images, as `held_out_<score>`."""
    found = held_out.clusters(state, "held-out")
    return {f"held_out_{k}": v for k, v in cluster_scores(held_out.labels, found).items()}


def fit_on_cluster(space: SearchSpace, sweep: SweepSettings) -> tuple[int, float]:
    """Trials at once and CPUs per Ray Train worker, so that concurrent trials fit the cluster."""
    import ray

    from distcluster.cluster.ray_train import share_cpus

    workers = max(cfg.workers for cfg in space.extreme_configs())
    resources = ray.cluster_resources()
    gpu = any(cfg.gpu for cfg in space.extreme_configs())
    room = resources.get("GPU", 0) if gpu else resources.get("CPU", 1.0)
    concurrent = sweep.max_concurrent or max(1, int(room // workers))
    return concurrent, share_cpus(resources.get("CPU", 1.0), concurrent * workers)


def param_space(space: SearchSpace) -> dict[str, Any]:
    from ray import tune

    make = {"choice": lambda v: tune.choice(list(v)), "grid_search": lambda v: tune.grid_search(list(v)),
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(v[0], v[1] + 1)}  # Tune's upper end is excluded
    return {dim.key: make[dim.kind](dim.values) for dim in space.dimensions}


def trial_count(space: SearchSpace, samples: int) -> int:
    """Tune runs `samples` trials, or `samples` repeats of the grid when there is one."""
    return samples * math.prod(len(d.values) for d in space.dimensions if d.kind == "grid_search")


def trial_progress(total: int, metric: str):
    """A Tune callback: a progress bar over trials and one line per finished trial."""
    from ray.tune import Callback
    from tqdm import tqdm

    class TrialProgress(Callback):
        def __init__(self) -> None:
            self.bar = tqdm(total=total, desc="trials", unit="trial")

        def _done(self, trial: Any, how: str) -> None:
            r = trial.last_result or {}
            keys = dict.fromkeys((metric, "eval/view_mi", "eval/acc"))  # the metric first, once
            shown = " ".join(f"{k.split('/')[1]}={r[k]:.4f}" for k in keys
                             if isinstance(r.get(k), float))
            line = f"trial {trial.trial_id} {how} at epoch {r.get('epoch', 0)}: {shown}"
            self.bar.write(line, file=sys.stderr)
            self.bar.update()

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._done(trial, "ended")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._done(trial, "FAILED")

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            self.bar.close()

    return TrialProgress()


def run_tuner(sweep: Sweep, settings: SweepSettings, concurrent: int, out: Path) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    max_epochs = max(cfg.epochs for cfg in sweep.space.extreme_configs())
    seed = sweep.space.base["seed"]
    if settings.grace_period < max_epochs:
        scheduler = ASHAScheduler(time_attr="epoch", max_t=max_epochs, grace_period=settings.grace_period,
                                  reduction_factor=settings.reduction_factor,
                                  stop_last_trials=False)  # a finished trial still exports its model
    else:  # no rung before the last epoch: every trial runs to the end
        scheduler = FIFOScheduler()
    if settings.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search, limit = OptunaSearch(seed=seed), concurrent
    else:  # the same draws on every run; it keeps its own concurrency limit (Tune warns if given one)
        search, limit = BasicVariantGenerator(random_state=seed, max_concurrent=concurrent), None
    # Tune's new output engine prints its banner on stdout even at verbose=0; the old one, nothing.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    trials = trial_count(sweep.space, settings.samples)
    tuner = tune.Tuner(
        # The driver only waits on its TorchTrainer: the workers hold the CPUs (Ray
        # refuses an empty request, hence a sliver).
        tune.with_resources(tune.with_parameters(run_trial, sweep=sweep), {"CPU": DRIVER_CPUS}),
        param_space=param_space(sweep.space),
        tune_config=tune.TuneConfig(metric=sweep.metric, mode="max", scheduler=scheduler,
                                    search_alg=search, num_samples=settings.samples,
                                    max_concurrent_trials=limit),
        run_config=tune.RunConfig(name="tune", storage_path=str(out.resolve() / "ray"), verbose=0,
                                  callbacks=[trial_progress(trials, sweep.metric)]),
    )
    results = tuner.fit()
    if results.num_terminated + results.num_errors < trials:
        raise KeyboardInterrupt  # Ctrl-C: Tune stops its trials and returns what had ended
    return results


@dataclass
class TrialRecord:
    trial_id: str
    config: dict[str, Any]  # the sampled values
    status: str  # completed | stopped_early | failed
    epochs: int
    view_mi: float | None
    acc: float | None
    run_id: str | None
    model_uri: str | None
    consensus: float | None = None  # the label-free score, of finished trials only
    held_out_acc: float | None = None  # ACC on the --eval-data images, of finished trials only

    def value(self, field: str) -> float | None:
        return getattr(self, field)


def trial_records(results, sweep: Sweep, tracker: RunTracker) -> list[TrialRecord]:
    """One record per trial; child runs of stopped or failed trials are closed as KILLED/FAILED."""
    runs = tracker.client.search_runs([tracker.experiment_id],
                                      f"tags.`mlflow.parentRunId` = '{sweep.parent_run_id}'")
    run_of = {run.data.tags.get(TRIAL_TAG): run for run in runs}
    records = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        folder = Path(sweep.output) / "trials" / trial_id
        model = folder / "model" / "MLmodel"  # written at the end
        status = "failed" if result.error else "completed" if model.is_file() else "stopped_early"
        run = run_of.get(trial_id)
        if run is not None and status != "completed":
            tracker.client.set_tag(run.info.run_id, "distcluster.status", status)
            ended = "KILLED" if status == "stopped_early" else "FAILED"
            tracker.client.set_terminated(run.info.run_id, ended)
        records.append(TrialRecord(
            trial_id, dict(result.config), status, int(metrics.get("epoch", 0)),
            metrics.get("eval/view_mi"), metrics.get("eval/acc"),
            run.info.run_id if run else None,
            f"runs:/{run.info.run_id}/model" if run and status == "completed" else None,
            held_out_acc=_held_out_acc(folder) if status == "completed" else None))
    return sorted(records, key=lambda r: r.trial_id)


def _held_out_acc(folder: Path) -> float | None:
    scores = folder / HELD_OUT_SCORES
    return json.loads(scores.read_text())["held_out_acc"] if scores.is_file() else None


def _partition(record: TrialRecord, sweep: Sweep) -> np.ndarray:
    """A finished trial's clusters of the consensus images."""
    return np.load(Path(sweep.output) / "trials" / record.trial_id / "consensus" / "clusters.npy")


def score_consensus(records: list[TrialRecord], sweep: Sweep, tracker: RunTracker) -> None:
    """The label-free score of every finished trial: its agreement with the others, each
    weighted by its view_mi."""
    done = [r for r in records if r.status == "completed" and r.view_mi is not None]
    partitions = [_partition(r, sweep) for r in done]
    for record, agreement in zip(done, consensus(partitions, [r.view_mi for r in done]), strict=True):
        record.consensus = agreement
        if record.run_id:
            tracker.client.log_metric(record.run_id, "final/consensus", agreement)


def best_trial(records: list[TrialRecord], field: str) -> TrialRecord:
    done = [r for r in records if r.status == "completed" and r.value(field) is not None]
    if not done:
        raise RunFailed(f"no trial completed (statuses: {[r.status for r in records]})")
    # Ties (two finished trials share one NMI) go to the more stable one.
    return max(done, key=lambda r: (r.value(field), r.view_mi or 0.0))


def clusters_of(record: TrialRecord, sweep: Sweep) -> int:
    return int(record.config.get("clusters", sweep.space.base["clusters"]))


def choose_clusters(records: list[TrialRecord], sweep: Sweep) -> dict[str, Any] | None:
    """For a space that searches exactly the number of clusters and the seed, the stability of
    each K that finished with at least two seeds (core.metrics.stability_by_clusters on the
    consensus images) and the recommended K; None for other spaces, or with fewer than two
    such K."""
    if {d.key for d in sweep.space.dimensions} != CHOOSING_CLUSTERS:
        return None
    partitions: dict[int, list[np.ndarray]] = {}
    for record in records:
        if record.status == "completed":
            partitions.setdefault(clusters_of(record, sweep), []).append(_partition(record, sweep))
    stability = stability_by_clusters(partitions)
    if len(stability) < 2:
        return None
    return {"k": recommended_clusters(stability), "criterion": "stability",
            "stability": {str(k): round(v, 4) for k, v in stability.items()},
            "runs": {str(k): len(partitions[k]) for k in stability}}

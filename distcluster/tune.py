"""`python -m distcluster.tune`: a Ray Tune sweep; every trial is a Ray Train run.

Each trial runs a driver function that builds a `TorchTrainer` with the trial's
config (its `workers` Ray Train workers) and forwards every evaluated epoch to
Tune, whose ASHA scheduler stops the weak trials early. MLflow holds one parent
run per sweep and one child run per trial (params, per-epoch metrics, model,
learning curves). The best trial is picked by ACC (`--select labels`) or, with
no labels needed, by its consensus with the other finished trials (`--select
unsupervised`; metrics.consensus, weighted by metrics.view_mi); `--register
NAME` gives its model the alias `champion`. Writes OUTPUT/tune_summary.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distcluster import config as configuration
from distcluster import plots
from distcluster.build import check_fits, set_cpu_speedups
from distcluster.checkpoint import newest_valid_checkpoint, write_atomic_dir, write_json_atomic
from distcluster.cli import PREPARE_HINT, ArgumentParser, run_command
from distcluster.config import apply_override
from distcluster.data import ArraySource, ImageSource, gather_images
from distcluster.errors import ConfigError, RunFailed, UserError
from distcluster.evaluation import final_probs
from distcluster.metrics import consensus
from distcluster.mlflow_model import save_mlflow_model
from distcluster.search_space import SEARCHES, SearchSpace, SweepSettings, load_space, space_names
from distcluster.sources import open_source, resolve_data
from distcluster.tracking import RunTracker, check_reachable, resolve_tracking_uri

PROG = "distcluster.tune"
# --select: the per-epoch metric ASHA compares, and the record field that ranks finished trials.
METRICS = {"labels": "eval/acc", "unsupervised": "eval/view_mi"}
RANKED_BY = {"labels": "acc", "unsupervised": "consensus"}
CONSENSUS_IMAGES = 2000  # images every finished model assigns, to compare the models
CHAMPION = "champion"
TRIAL_TAG = "distcluster.trial_id"
DRIVER_CPUS = 0.01


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--space", required=True,
                   help=f"search space name or YAML file (spaces: {', '.join(space_names())})")
    p.add_argument("--data", help="data SPEC for every trial (default: the space's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="fix a config key for every trial, e.g. --set seed=1 (repeatable)")
    p.add_argument("--samples", type=int, help="trials to sample (with grid_search: grid repeats)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: what the CPUs/GPUs hold)")
    p.add_argument("--select", choices=tuple(METRICS),
                   help="rank trials by ACC (labels) or by label-free consensus "
                        "(default: labels when the data has them)")
    p.add_argument("--search", choices=SEARCHES, help="random (default) or optuna (TPE)")
    p.add_argument("--grace-period", type=int, help="epochs before ASHA may stop a trial")
    p.add_argument("--register", metavar="MODEL_NAME", help="register the best model with alias champion")
    p.add_argument("--output", help="output folder (default runs/tune-<space>-<time>)")
    p.add_argument("--experiment", help="MLflow experiment (default: the space's, distcluster)")
    p.add_argument("--tracking-uri", help="MLflow URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    return p


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
    consensus_indices: list[int]  # the images every finished model assigns


def _trial(sampled: dict[str, Any], sweep: Sweep) -> None:
    """Tune's driver function for one trial: a TorchTrainer run in a child MLflow run."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from distcluster import ray_train

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = sweep.space.trial_config(sampled)
    if not cfg.cpus_per_worker:  # an elastic trial's workers hold whole CPUs (see ray_train)
        cfg.cpus_per_worker = max(1.0, sweep.cpus_per_worker // 1) if cfg.elastic else sweep.cpus_per_worker
    folder = Path(sweep.output) / "trials" / trial_id
    tracker = RunTracker.start(sweep.tracking_uri, sweep.experiment, f"{sweep.space.name}-{trial_id}",
                               tags={"mlflow.parentRunId": sweep.parent_run_id, TRIAL_TAG: trial_id})
    tracker.log_params(cfg.flat())
    with tracker.ending():
        run = ray_train.fit(cfg, sweep.data, {"uri": tracker.tracking_uri, "run_id": tracker.run_id},
                            folder / "ray", trial_id, callbacks=[TuneReportCallback()])
        found = newest_valid_checkpoint(run.checkpoint_dirs)
        if found is None:
            raise RuntimeError(f"trial {trial_id} ended without a readable checkpoint")
        state = found[0]
        write_atomic_dir(folder / "model", lambda d: save_mlflow_model(state, d))
        write_atomic_dir(folder / "plots", lambda d: plots.learning_curves(state["history"],
                                                                           d / "learning_curves.png"))
        tracker.log_artifacts(folder / "model", "model")
        tracker.log_artifacts(folder / "plots", "plots")
        clusters = _assign_sample(state, sweep)
        write_atomic_dir(folder / "consensus", lambda d: np.save(d / "clusters.npy", clusters))


def _assign_sample(state: dict[str, Any], sweep: Sweep) -> np.ndarray:
    """The trial's clusters of the consensus images."""
    source = open_source(sweep.data, sweep.space.base["max_samples"])
    found = gather_images(source, np.asarray(sweep.consensus_indices))
    sample = ArraySource.from_hwc(np.stack([found[i] for i in sweep.consensus_indices]), None, "consensus")
    return final_probs(state, sample).argmax(1).astype(np.int32)


def consensus_sample(count: int, seed: int) -> list[int]:
    """Up to CONSENSUS_IMAGES image indices, drawn once per sweep."""
    chosen = np.random.default_rng(seed).choice(count, min(count, CONSENSUS_IMAGES), replace=False)
    return sorted(int(i) for i in chosen)


# ------------------------------------------------------------------ the sweep
def _sweep_settings(space: SearchSpace, args: argparse.Namespace) -> SweepSettings:
    sweep = space.sweep.overridden({"samples": args.samples, "max_concurrent": args.max_concurrent,
                                    "grace_period": args.grace_period, "search": args.search})
    space.check_search(sweep.search)
    return sweep


def _fit_on_cluster(space: SearchSpace, sweep: SweepSettings) -> tuple[int, float]:
    """Trials at once and CPUs per Ray Train worker, so that concurrent trials fit the cluster."""
    import ray

    from distcluster.ray_train import share_cpus

    workers = max(cfg.workers for cfg in space.extreme_configs())
    resources = ray.cluster_resources()
    gpu = any(cfg.gpu for cfg in space.extreme_configs())
    room = resources.get("GPU", 0) if gpu else resources.get("CPU", 1.0)
    concurrent = sweep.max_concurrent or max(1, int(room // workers))
    return concurrent, share_cpus(resources.get("CPU", 1.0), concurrent * workers)


def _param_space(space: SearchSpace) -> dict[str, Any]:
    from ray import tune

    make = {"choice": lambda v: tune.choice(list(v)), "grid_search": lambda v: tune.grid_search(list(v)),
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(v[0], v[1] + 1)}  # Tune's upper end is excluded
    return {dim.key: make[dim.kind](dim.values) for dim in space.dimensions}


def _trial_count(space: SearchSpace, samples: int) -> int:
    """Tune runs `samples` trials, or `samples` repeats of the grid when there is one."""
    return samples * math.prod(len(d.values) for d in space.dimensions if d.kind == "grid_search")


def _progress(total: int, metric: str):
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
            self.bar.write(f"trial {trial.trial_id} {how} at epoch {r.get('epoch', 0)}: {shown}")
            self.bar.update()

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._done(trial, "ended")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._done(trial, "FAILED")

        def on_experiment_end(self, trials: list, **info: Any) -> None:
            self.bar.close()

    return TrialProgress()


def _run_tuner(sweep: Sweep, settings: SweepSettings, concurrent: int, out: Path) -> Any:
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

        search = OptunaSearch(seed=seed)
    else:
        # The same draws on every run; a searcher given to Tune keeps its own concurrency limit.
        search = BasicVariantGenerator(random_state=seed, max_concurrent=concurrent)
    tuner = tune.Tuner(
        # The driver only waits on its TorchTrainer: the workers hold the CPUs (Ray
        # refuses an empty request, hence a sliver).
        tune.with_resources(tune.with_parameters(_trial, sweep=sweep), {"CPU": DRIVER_CPUS}),
        param_space=_param_space(sweep.space),
        tune_config=tune.TuneConfig(metric=sweep.metric, mode="max", scheduler=scheduler,
                                    search_alg=search, num_samples=settings.samples,
                                    max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(name="tune", storage_path=str(out.resolve() / "ray"), verbose=0,
                                  callbacks=[_progress(_trial_count(sweep.space, settings.samples),
                                                       sweep.metric)]),
    )
    return tuner.fit()


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

    def value(self, field: str) -> float | None:
        return getattr(self, field)


def _records(results, sweep: Sweep, tracker: RunTracker) -> list[TrialRecord]:
    """One record per trial; child runs of stopped or failed trials are closed as KILLED/FAILED."""
    runs = tracker.client.search_runs([tracker.experiment_id],
                                      f"tags.`mlflow.parentRunId` = '{sweep.parent_run_id}'")
    run_of = {run.data.tags.get(TRIAL_TAG): run for run in runs}
    records = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = metrics.get("trial_id") or Path(result.path).name
        model = Path(sweep.output) / "trials" / trial_id / "model" / "MLmodel"  # written at the end
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
            f"runs:/{run.info.run_id}/model" if run and status == "completed" else None))
    return sorted(records, key=lambda r: r.trial_id)


def _score(records: list[TrialRecord], sweep: Sweep, tracker: RunTracker) -> None:
    """The label-free score of every finished trial: its agreement with the others, each
    weighted by its view_mi."""
    done = [r for r in records if r.status == "completed" and r.view_mi is not None]
    partitions = [np.load(Path(sweep.output) / "trials" / r.trial_id / "consensus" / "clusters.npy")
                  for r in done]
    for record, agreement in zip(done, consensus(partitions, [r.view_mi for r in done]), strict=True):
        record.consensus = agreement
        if record.run_id:
            tracker.client.log_metric(record.run_id, "final/consensus", agreement)


def _best(records: list[TrialRecord], field: str) -> TrialRecord:
    done = [r for r in records if r.status == "completed" and r.value(field) is not None]
    if not done:
        raise RunFailed(f"no trial completed (statuses: {[r.status for r in records]})")
    # Ties (two finished trials share one NMI) go to the more stable one.
    return max(done, key=lambda r: (r.value(field), r.view_mi or 0.0))


def _register_champion(tracker: RunTracker, best: TrialRecord, name: str) -> str:
    from distcluster.registry import register

    version = register(RunTracker(tracker.tracking_uri, best.run_id), name)
    tracker.client.set_registered_model_alias(name, CHAMPION, version)
    print(f"registered models:/{name}/{version} as models:/{name}@{CHAMPION}")
    return version


def _log_sweep(tracker: RunTracker, records: list[TrialRecord], params: list[str], ranked_by: str,
               out: Path) -> None:
    """The parent run gets the trial table and a plot of the metric against every parameter."""
    import pandas as pd

    rows = [{"trial_id": r.trial_id, "status": r.status, "epochs": r.epochs, "view_mi": r.view_mi,
             "consensus": r.consensus, "acc": r.acc, **r.config} for r in records]

    def write(folder: Path) -> None:
        pd.DataFrame(rows).to_csv(folder / "trials.csv", index=False)
        # Every trial has view_mi and, with labels, ACC; only finished ones have a consensus.
        plots.sweep(rows, params, "acc" if ranked_by == "acc" else "view_mi", folder / "sweep.png")

    write_atomic_dir(out / "sweep", write)
    tracker.log_artifacts(out / "sweep", "sweep")


def _checked_sweep(args: argparse.Namespace) -> tuple[SearchSpace, SweepSettings, str, ImageSource]:
    """The space with --data and --set applied, the sweep settings, and the data resolved and
    opened, after every trial's config was checked against it (before Ray or MLflow start)."""
    space = load_space(args.space)
    for override in ([f"data={args.data}"] if args.data else []) + args.set:
        space.base = configuration.from_dict(apply_override(space.base, override)).to_dict()
    settings = _sweep_settings(space, args)
    if args.register is not None:
        configuration.check_model_name(args.register)
    data = resolve_data(space.base["data"])
    source = open_source(data, space.base["max_samples"])
    for cfg in space.extreme_configs():
        check_fits(cfg, source)
        if cfg.workers < 1:
            raise ConfigError("workers", cfg.workers, "tune runs every trial on Ray Train workers: "
                                                      "must be >= 1")
    return space, settings, data, source


def _selection(select: str | None, space: SearchSpace, source: ImageSource) -> str:
    """--select, or by default labels when the data has them."""
    select = select or ("labels" if source.labels is not None else "unsupervised")
    if select == "labels" and source.labels is None:
        raise UserError(f"--select labels needs labels; '{space.base['data']}' has none "
                        "(use --select unsupervised)")
    return select


def tune(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from distcluster import ray_train

    started = time.perf_counter()
    set_cpu_speedups()
    space, settings, data, source = _checked_sweep(args)
    select = _selection(args.select, space, source)
    metric, ranked_by = METRICS[select], RANKED_BY[select]
    uri = resolve_tracking_uri(args.tracking_uri or space.base["tracking_uri"])
    check_reachable(uri)
    ray_train.use_fast_controller_poll(os.environ)  # a bad value said before anything is written
    out = Path(args.output or f"runs/tune-{space.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if (out / "tune_summary.json").exists():
        raise UserError(f"{out} already holds a finished sweep; choose another --output")
    out.mkdir(parents=True, exist_ok=True)
    experiment = args.experiment or space.base["experiment"]
    tracker = RunTracker.start(uri, experiment, f"sweep-{space.name}", tags={"distcluster.space": space.name})
    try:
        with tracker.ending():
            ray_train.init_ray()
            concurrent, cpus = _fit_on_cluster(space, settings)
            tracker.log_params({"space": space.name, "select": select, "metric": metric,
                                "data": space.base["data"], "max_concurrent": concurrent,
                                **{k: v for k, v in dataclasses.asdict(settings).items()
                                   if k != "max_concurrent"},
                                **{f"space.{d.key}": f"{d.kind}{list(d.values)}" for d in space.dimensions}})
            sweep = Sweep(space, data, metric, uri, experiment, tracker.run_id, str(out.resolve()), cpus,
                          consensus_sample(len(source), space.base["seed"]))
            results = _run_tuner(sweep, settings, concurrent, out)
            records = _records(results, sweep, tracker)
            _score(records, sweep, tracker)
            best = _best(records, ranked_by)
            _log_sweep(tracker, records, [d.key for d in space.dimensions], ranked_by, out)
            version = _register_champion(tracker, best, args.register) if args.register else None
            summary = _summary(space, select, ranked_by, records, best, tracker, args.register, version,
                               time.perf_counter() - started)
            stopped_early = sum(r.status == "stopped_early" for r in records)
            tracker.log_metrics({f"best/{ranked_by}": best.value(ranked_by),
                                 "trials_stopped_early": stopped_early}, 0)
            write_json_atomic(out / "tune_summary.json", summary)
            tracker.log_artifact(out / "tune_summary.json")
    finally:
        if ray.is_initialized():
            try:  # also when the sweep failed or was interrupted: no trial outlives it
                ray_train.release_placement_groups()
            finally:
                ray.shutdown()
    _print_result(summary, out)
    return summary


def _summary(space: SearchSpace, select: str, ranked_by: str, records: list[TrialRecord], best: TrialRecord,
             tracker: RunTracker, name: str | None, version: str | None, wall: float) -> dict[str, Any]:
    def row(r: TrialRecord) -> dict[str, Any]:
        return {"trial_id": r.trial_id, "status": r.status, "epochs": r.epochs, "config": r.config,
                "view_mi": r.view_mi, "consensus": r.consensus, "acc": r.acc,
                "run_id": r.run_id, "model_uri": r.model_uri}

    return {
        "space": space.name, "data": space.base["data"], "select": select, "metric": ranked_by,
        "best": {**row(best), "metric": best.value(ranked_by),
                 "full_config": space.trial_config(best.config).to_dict()},
        "trials": [row(r) for r in records],
        "stopped_early": sum(r.status == "stopped_early" for r in records),
        "wall_seconds": round(wall, 1),
        "registered_model": name, "version": version, "alias": CHAMPION if version else None,
        "model_uri": f"models:/{name}@{CHAMPION}" if version else best.model_uri,
        "mlflow": {"tracking_uri": tracker.tracking_uri, "experiment_id": tracker.experiment_id,
                   "parent_run_id": tracker.run_id},
    }


def _print_result(summary: dict[str, Any], out: Path) -> None:
    best = summary["best"]
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in best["config"].items())
    acc = f", ACC {best['acc']:.4f}" if best["acc"] is not None else ""
    print(f"best of {len(summary['trials'])} trials ({summary['stopped_early']} stopped early) by "
          f"{summary['metric']}: {best['trial_id']} {shown}: consensus {best['consensus']:.4f}, "
          f"view_mi {best['view_mi']:.4f}{acc}")
    print(f"model: {summary['model_uri']}   summary: {out / 'tune_summary.json'}")


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, lambda: tune(build_parser().parse_args(argv)), corrupt_hint=PREPARE_HINT)


if __name__ == "__main__":
    sys.exit(main())

"""`python -m distcluster.tune`: a Ray Tune sweep; every trial is a Ray Train run
(distcluster.cluster.sweep). MLflow holds one parent run per sweep and one child run per
trial (params, per-epoch metrics, model, learning curves). The best trial is picked by
ACC (`--select labels`) or, with no labels needed, by its consensus with the other finished
trials (`--select unsupervised`); `--register NAME` gives its model the alias
`champion`. A space that tries several numbers of clusters, each with several seeds, gets
the recommended number (the K whose seeds agree most: `recommended_clusters`), and without
labels the best trial is picked at that K. Writes OUTPUT/tune_summary.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Any

from distcluster import config as configuration
from distcluster.cluster.search_space import SEARCHES, SearchSpace, SweepSettings, load_space, space_names
from distcluster.cluster.sweep import (
    CONSENSUS_IMAGES,
    HELD_OUT_IMAGES,
    Sample,
    Sweep,
    TrialRecord,
    best_trial,
    choose_clusters,
    clusters_of,
    fit_on_cluster,
    run_tuner,
    score_consensus,
    trial_records,
)
from distcluster.commands.cli import PREPARE_HINT, ArgumentParser, run_command
from distcluster.common.errors import ConfigError, UserError
from distcluster.common.files import check_output_folder, write_atomic_dir, write_json_atomic
from distcluster.config import apply_override
from distcluster.core.metrics import selection_quality
from distcluster.data.arrays import ImageSource
from distcluster.data.sources import open_source, resolve_data
from distcluster.engine.build import check_fits, set_cpu_speedups
from distcluster.tracking import plots
from distcluster.tracking.runs import RunTracker, check_reachable, resolve_tracking_uri

PROG = "distcluster.tune"
# --select: the per-epoch metric ASHA compares, and the record field that ranks finished trials.
METRICS = {"labels": "eval/acc", "unsupervised": "eval/view_mi"}
RANKED_BY = {"labels": "acc", "unsupervised": "consensus"}
CHAMPION = "champion"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--space", required=True,
                   help=f"search space name or YAML file (spaces: {', '.join(space_names())})")
    p.add_argument("--data", help="data SPEC for every trial (default: the space's)")
    p.add_argument("--eval-data", metavar="SPEC",
                   help="labelled images no trial trains on (e.g. a held-out part of the same pile): every "
                        "finished trial is scored on them, and --select labels ranks by that ACC")
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


def _sweep_settings(space: SearchSpace, args: argparse.Namespace) -> SweepSettings:
    sweep = space.sweep.overridden({"samples": args.samples, "max_concurrent": args.max_concurrent,
                                    "grace_period": args.grace_period, "search": args.search})
    space.check_search(sweep.search)
    return sweep


def _register_champion(tracker: RunTracker, best: TrialRecord, name: str) -> str:
    from distcluster.tracking.registry import register

    version = register(RunTracker(tracker.tracking_uri, best.run_id), name)
    tracker.client.set_registered_model_alias(name, CHAMPION, version)
    print(f"registered models:/{name}/{version} as models:/{name}@{CHAMPION}")
    return version


def _best(records: list[TrialRecord], ranked_by: str, choice: dict[str, Any] | None,
          sweep: Sweep) -> TrialRecord:
    """The best trial; without labels, among those at the recommended number of clusters."""
    if choice is None or ranked_by != "consensus":
        return best_trial(records, ranked_by)
    return best_trial([r for r in records if clusters_of(r, sweep) == choice["k"]], ranked_by)


def _label_free_quality(records: list[TrialRecord], choice: dict[str, Any] | None,
                        sweep: Sweep) -> dict[str, Any] | None:
    """Where the trials have labels: how well the label-free score ranks the finished trials by
    ACC (held-out ACC with --eval-data), and the gap between the trial it picks and the best."""
    acc = "held_out_acc" if any(r.held_out_acc is not None for r in records) else "acc"
    done = [r for r in records if r.status == "completed" and r.consensus is not None
            and r.value(acc) is not None]
    if len(done) < 2:
        return None
    picked = _best(done, "consensus", choice, sweep)
    quality = selection_quality([r.consensus for r in done], [r.value(acc) for r in done], done.index(picked))
    return {"acc": acc, "trials": len(done), "picked": picked.trial_id,
            "best": max(done, key=lambda r: r.value(acc)).trial_id, **quality,
            "points": {r.trial_id: [r.consensus, r.value(acc)] for r in done}}


def _log_sweep(tracker: RunTracker, records: list[TrialRecord], params: list[str], ranked_by: str,
               out: Path, choice: dict[str, Any] | None, quality: dict[str, Any] | None) -> None:
    """The parent run gets the trial table, a plot of the metric against every parameter, one of
    the label-free score against ACC (with labels) and, where the sweep chose the number of
    clusters, the stability of each K (a plot, a metric stepped by K) and the recommendation."""
    import pandas as pd

    rows = [{"trial_id": r.trial_id, "status": r.status, "epochs": r.epochs, "view_mi": r.view_mi,
             "consensus": r.consensus, "acc": r.acc, "held_out_acc": r.held_out_acc, **r.config}
            for r in records]

    def write(folder: Path) -> None:
        pd.DataFrame(rows).to_csv(folder / "trials.csv", index=False)
        # Every trial has view_mi and, with labels, ACC; only finished ones have a consensus
        # and a held-out ACC.
        shown = ranked_by if ranked_by in ("acc", "held_out_acc") else "view_mi"
        plots.sweep(rows, params, shown, folder / "sweep.png")
        if choice is not None:
            plots.stability(choice["stability"], choice["k"], folder / "choose_clusters.png")
        if quality is not None:
            plots.label_free_vs_acc(quality["points"], quality["picked"], quality["acc"], quality["spearman"],
                                    folder / "label_free_vs_acc.png")

    write_atomic_dir(out / "sweep", write)
    tracker.log_artifacts(out / "sweep", "sweep")
    if quality is not None:
        tracker.log_metrics({f"label_free/{k}": quality[k] for k in ("spearman", "gap")
                             if quality[k] is not None}, 0)
    if choice is not None:
        for k, value in choice["stability"].items():
            tracker.log_metrics({"stability": value}, int(k))
        tracker.log_metrics({"recommended_clusters": choice["k"]}, 0)


def _checked_sweep(args: argparse.Namespace) -> tuple[SearchSpace, SweepSettings, str, ImageSource]:
    """The space with --data and --set applied, the sweep settings, and the data resolved and
    opened, after every trial's config was checked against it (before Ray or MLflow start)."""
    space = load_space(args.space)
    for override in ([f"data={args.data}"] if args.data else []) + args.set:
        space.base = configuration.from_dict(apply_override(space.base, override)).to_dict()
    settings = _sweep_settings(space, args)
    if args.register is not None:
        configuration.check_model_name(args.register)
    data = resolve_data(space.base["data"], max_resolution=space.base["max_resolution"])
    source = open_source(data, space.base["max_samples"])
    for cfg in space.extreme_configs():
        check_fits(cfg, source)
        if cfg.workers < 1:
            raise ConfigError("workers", cfg.workers, "tune runs every trial on Ray Train workers: "
                                                      "must be >= 1")
    return space, settings, data, source


def _held_out(spec: str | None, space: SearchSpace, source: ImageSource) -> Sample | None:
    """--eval-data, checked (labelled, as many channels as the training images) and drawn once."""
    if spec is None:
        return None
    held_out = open_source(resolve_data(spec, max_resolution=space.base["max_resolution"]))
    if len(held_out) == 0:
        raise UserError(f"--eval-data {spec} holds no images")
    if held_out.labels is None:
        raise UserError(f"--eval-data {spec} has no labels: it scores trials by ACC")
    if held_out.channels != source.channels:
        raise UserError(f"--eval-data {spec} has {held_out.channels}-channel images, the training data "
                        f"{source.channels}-channel ones")
    return Sample.draw(held_out, HELD_OUT_IMAGES, space.base["seed"])


def _selection(select: str | None, space: SearchSpace, source: ImageSource) -> str:
    """--select, or by default labels when the data has them."""
    select = select or ("labels" if source.labels is not None else "unsupervised")
    if select == "labels" and source.labels is None:
        raise UserError(f"--select labels needs labels; '{space.base['data']}' has none "
                        "(use --select unsupervised)")
    return select


def tune(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from distcluster.cluster import ray_train

    started = time.perf_counter()
    set_cpu_speedups()
    space, settings, data, source = _checked_sweep(args)
    select = _selection(args.select, space, source)
    held_out = _held_out(args.eval_data, space, source)
    metric, ranked_by = METRICS[select], RANKED_BY[select]
    if held_out is not None and select == "labels":
        ranked_by = "held_out_acc"
    uri = resolve_tracking_uri(args.tracking_uri or space.base["tracking_uri"])
    check_reachable(uri)
    ray_train.use_fast_controller_poll(os.environ)  # a bad value said before anything is written
    out = Path(args.output or f"runs/tune-{space.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    _check_output(out)
    out.mkdir(parents=True, exist_ok=True)
    experiment = args.experiment or space.base["experiment"]
    tracker = RunTracker.start(uri, experiment, f"sweep-{space.name}", tags={"distcluster.space": space.name})
    try:
        with tracker.ending():
            # The trials' lines stay in Ray's logs: here the progress bar and the result alone
            ray_train.init_ray()
            concurrent, cpus = fit_on_cluster(space, settings)
            tracker.log_params({"space": space.name, "select": select, "metric": metric,
                                "data": space.base["data"], "max_concurrent": concurrent,
                                **({"eval_data": args.eval_data} if args.eval_data else {}),
                                **{k: v for k, v in dataclasses.asdict(settings).items()
                                   if k != "max_concurrent"},
                                **{f"space.{d.key}": f"{d.kind}{list(d.values)}" for d in space.dimensions}})
            sweep = Sweep(space, data, metric, uri, experiment, tracker.run_id, str(out.resolve()), cpus,
                          Sample.draw(source, CONSENSUS_IMAGES, space.base["seed"]).images, held_out)
            results = run_tuner(sweep, settings, concurrent, out)
            records = trial_records(results, sweep, tracker)
            score_consensus(records, sweep, tracker)
            choice = choose_clusters(records, sweep)
            best = _best(records, ranked_by, choice, sweep)
            quality = _label_free_quality(records, choice, sweep)
            _log_sweep(tracker, records, [d.key for d in space.dimensions], ranked_by, out, choice, quality)
            version = _register_champion(tracker, best, args.register) if args.register else None
            summary = _summary(space, select, ranked_by, records, best, tracker, args.register, version,
                               time.perf_counter() - started)
            summary["recommended_clusters"] = choice
            summary["label_free_vs_acc"] = quality
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


def _check_output(out: Path) -> None:
    """A new or empty folder: a sweep is never resumed, and nothing of the user's is mixed in."""
    check_output_folder(out)
    if (out / "tune_summary.json").exists():
        raise UserError(f"{out} already holds a finished sweep; choose another --output")
    if out.is_dir() and any(out.iterdir()):
        raise UserError(f"--output {out} is not empty (an interrupted sweep is started again, "
                        "not resumed): name a new or empty folder")


def _summary(space: SearchSpace, select: str, ranked_by: str, records: list[TrialRecord], best: TrialRecord,
             tracker: RunTracker, name: str | None, version: str | None, wall: float) -> dict[str, Any]:
    def row(r: TrialRecord) -> dict[str, Any]:
        return {"trial_id": r.trial_id, "status": r.status, "epochs": r.epochs, "config": r.config,
                "view_mi": r.view_mi, "consensus": r.consensus, "acc": r.acc, "held_out_acc": r.held_out_acc,
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
    acc += f", held-out ACC {best['held_out_acc']:.4f}" if best["held_out_acc"] is not None else ""
    print(f"best of {len(summary['trials'])} trials ({summary['stopped_early']} stopped early) by "
          f"{summary['metric']}: {best['trial_id']} {shown}: consensus {best['consensus']:.4f}, "
          f"view_mi {best['view_mi']:.4f}{acc}")
    choice = summary["recommended_clusters"]
    if choice is not None:
        print(f"recommended clusters: {choice['k']} (stability of each K, the mean AMI between its seeds' "
              "runs: " + ", ".join(f"{k}: {v:.3f}" for k, v in choice["stability"].items()) + ")")
    quality = summary["label_free_vs_acc"]
    if quality is not None:
        rho = "n/a" if quality["spearman"] is None else f"{quality['spearman']:.3f}"
        print(f"without labels the pick would be {quality['picked']}: {quality['acc']} "
              f"{quality['picked_acc']:.4f}, best {quality['best_acc']:.4f} (gap {quality['gap']:.4f}; "
              f"Spearman of consensus and {quality['acc']} over {quality['trials']} finished trials: {rho})")
    print(f"model: {summary['model_uri']}   summary: {out / 'tune_summary.json'}")


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, lambda: tune(build_parser().parse_args(argv)), corrupt_hint=PREPARE_HINT)


if __name__ == "__main__":
    sys.exit(main())

"""`python -m distcluster.train`: train a clustering network, log to MLflow, write summary.json.

With no arguments: IMC-SwAV on the embedded digits data with 2 local Ray workers.
Also the Ray Jobs entry point: `ray job submit -- python -m distcluster.train ...`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from distcluster import config as configuration
from distcluster.commands.cli import ArgumentParser, run_command
from distcluster.common.errors import ConfigError, UserError
from distcluster.common.files import check_output_folder, write_atomic_dir, write_json_atomic
from distcluster.config import Config
from distcluster.data.arrays import ImageSource
from distcluster.data.sources import open_source, resolve_data
from distcluster.engine.build import WorkerContext, check_fits, set_cpu_speedups
from distcluster.engine.checkpoint import KEEP_CHECKPOINTS, newest_valid_checkpoint, save_checkpoint
from distcluster.engine.evaluation import clustering_scores, final_assignments
from distcluster.engine.loop import EpochReport, train_loop
from distcluster.tracking.outputs import log_model_and_plots
from distcluster.tracking.registry import register
from distcluster.tracking.runs import RunTracker, check_reachable, resolve_tracking_uri

PROG = "distcluster.train"
RUN_RECORD = "run.json"  # run name and MLflow run id: a rerun with the same name resumes


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--config", help="packaged recipe name or YAML file "
                   f"(recipes: {', '.join(configuration.recipe_names())})")
    p.add_argument("--data", help="digits | FILE.beton | folder | FILE.zip | FILE.npz | cifar10:ROOT | "
                   "cifar100-20:ROOT (default: digits)")
    p.add_argument("--objective", choices=configuration.OBJECTIVES)
    p.add_argument("--clusters", type=int, help="number of clusters K")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="global batch, split over workers")
    p.add_argument("--workers", type=_whole_number_or_range, metavar="N|MIN-MAX",
                   help="Ray Train workers; 0 = in-process (default 2); MIN-MAX: an elastic group that "
                   "trains on fewer workers while nodes are gone and grows back when they return")
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--seed", type=int)
    p.add_argument("--max-failures", type=int, help="Ray worker-group restarts before failing (default 3)")
    p.add_argument("--on-error", choices=("fail", "skip"),
                   help="a corrupt image in a folder or zip stops the run (fail, default) or is left out")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set optim.lr=1e-3 (repeatable)")
    p.add_argument("--output", help="output folder (default runs/<run-name>)")
    p.add_argument("--experiment", help="MLflow experiment (default distcluster)")
    p.add_argument("--run-name")
    p.add_argument("--register", metavar="MODEL_NAME",
                   help="register the model as a new version of MODEL_NAME (models:/MODEL_NAME@latest)")
    p.add_argument("--tracking-uri", help="MLflow URI (default $MLFLOW_TRACKING_URI or "
                   "sqlite:///mlflow.db)")
    return p


def _whole_number_or_range(text: str) -> int | str:
    """--workers 2 or --workers 1-4 (the range is checked with the rest of the config)."""
    return int(text) if text.strip().isdigit() else text


FLAG_KEYS = ("data", "objective", "clusters", "epochs", "batch_size", "workers", "gpu", "seed",
             "max_failures", "on_error", "output", "experiment", "run_name", "register", "tracking_uri")


def config_from_args(argv: list[str] | None) -> Config:
    """Recipe, then command-line flags, then --set overrides (later wins)."""
    args = build_parser().parse_args(argv)
    recipe = args.config or configuration.default_recipe(args.objective or "imc_swav",
                                                         args.data or "digits")
    values = configuration.load_recipe(recipe) if recipe else {}
    flags = {k: getattr(args, k) for k in FLAG_KEYS if getattr(args, k) is not None}
    values = configuration.merge(values, flags)
    for override in args.set:
        values = configuration.apply_override(values, override)
    return configuration.from_dict(values)


class _LocalReporter:
    """--workers 0: log epochs to MLflow and keep the last checkpoints on local disk."""

    def __init__(self, tracker: RunTracker, folder: Path) -> None:
        self.tracker = tracker
        self.folder = folder

    def epoch_end(self, report: EpochReport) -> None:
        self.tracker.log_metrics(report.metrics, step=report.epoch + 1)
        if not report.save:
            return
        state = report.checkpoint()
        write_atomic_dir(self.folder / f"epoch-{report.epoch + 1:05d}", lambda d: save_checkpoint(state, d))
        for old in sorted(self.folder.glob("epoch-*"))[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old)


@dataclass
class TrainedRun:
    """What training left: its newest verified checkpoint, and where each (re)start began."""

    checkpoint: dict[str, Any]
    starts: list[dict[str, Any]]  # {"time", "epoch" it resumed at, "workers"}; restarts = len - 1


def _newest_state(folders: list[Path]) -> dict[str, Any]:
    found = newest_valid_checkpoint(folders)
    if found is None:
        raise RuntimeError(f"no readable checkpoint among {[str(f) for f in folders]}")
    return found[0]


def fit(cfg: Config, source: ImageSource, data: str, tracker: RunTracker, out: Path,
        name: str) -> TrainedRun:
    """Train with Ray workers, or in-process for --workers 0, resuming from out/ when it holds
    checkpoints of this run."""
    if cfg.workers == 0:
        reporter = _LocalReporter(tracker, out / "checkpoints")
        found = newest_valid_checkpoint(checkpoint_folders(out, name))
        start = found[0] if found else None
        if start:
            print(f"resuming from epoch {start['epoch']}", flush=True)
        device = torch.device("cuda" if cfg.gpu else "cpu")
        started = {"time": time.time(), "epoch": start["epoch"] if start else 0, "workers": 1}
        train_loop(cfg, source, WorkerContext(device=device), reporter, start=start)
        return TrainedRun(_newest_state(checkpoint_folders(out, name)), [started])
    from distcluster.cluster import ray_train

    run = ray_train.fit(cfg, data, {"uri": tracker.tracking_uri, "run_id": tracker.run_id},
                        out / "ray", name, earlier=_in_process_checkpoints(out))
    return TrainedRun(_newest_state(run.checkpoint_dirs), run.starts)


def _in_process_checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("epoch-*"))


def checkpoint_folders(out: Path, name: str) -> list[Path]:
    """This run's checkpoints, whichever --workers wrote them: out/checkpoints (--workers 0)
    and Ray Train's out/ray/NAME. A run resumes from the newest, so a run started in-process
    goes on with Ray workers and the other way round."""
    with_ray = [p for p in (out / "ray" / name).glob("checkpoint_*") if p.is_dir()]
    return _in_process_checkpoints(out) + with_ray


def _resume_point(cfg: Config, out: Path, name: str) -> tuple[int, configuration.ResumeChanges] | None:
    """The epoch the run resumes at and what changed since its checkpoint (None: no checkpoint);
    ConfigError, before anything starts, for a change a checkpoint cannot take."""
    found = newest_valid_checkpoint(checkpoint_folders(out, name), warn=lambda _: None)
    if found is None:
        return None
    state = found[0]
    return state["epoch"], configuration.resume_changes(state["config"], cfg, state["epoch"])


def _previous_run(out: Path, name: str) -> dict[str, Any] | None:
    """This run's record in out/run.json, if an earlier invocation started it. An output that
    is not a folder, or a non-empty folder that distcluster did not write, is refused: nothing
    of the user's is ever replaced."""
    check_output_folder(out)
    path = out / RUN_RECORD
    if not path.is_file():
        if out.is_dir() and any(out.iterdir()):
            raise UserError(f"--output {out} is not empty and holds no distcluster run: "
                            "name a new or empty folder")
        return None
    try:
        record = json.loads(path.read_text())
        record["run_name"], record["run_id"]  # noqa: B018 - both must be there
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path} is not a distcluster run record (unreadable JSON)") from None
    if record["run_name"] != name:
        raise UserError(f"{out} holds run '{record['run_name']}'; use --run-name {record['run_name']} "
                        "to resume it, or another --output")
    return record


def _open_tracker(cfg: Config, record: dict[str, Any] | None, out: Path, name: str) -> RunTracker:
    uri = resolve_tracking_uri(cfg.tracking_uri)
    check_reachable(uri)
    if record is not None:
        return RunTracker.resume(uri, record["run_id"])
    tracker = RunTracker.start(uri, cfg.experiment, name, tags={"objective": cfg.objective, "data": cfg.data})
    tracker.log_params(cfg.flat())
    write_json_atomic(out / RUN_RECORD, {"run_name": name, "run_id": tracker.run_id,
                                         "experiment_id": tracker.experiment_id, "tracking_uri": uri})
    return tracker


def train(cfg: Config) -> dict[str, Any]:
    started = time.perf_counter()
    set_cpu_speedups()
    data = resolve_data(cfg.data, on_error=cfg.on_error, max_resolution=cfg.max_resolution)
    source = open_source(data, cfg.max_samples)
    check_fits(cfg, source)
    if cfg.workers:  # Ray's poll setting is the user's to get wrong: said before a run is opened
        from distcluster.cluster.ray_train import use_fast_controller_poll

        use_fast_controller_poll(os.environ)
    if cfg.gpu and cfg.workers == 0 and not torch.cuda.is_available():
        # With Ray workers the GPUs may live on other nodes: Ray then waits for them.
        raise ConfigError("gpu", True, "no CUDA GPU is visible to this process (use --no-gpu)")
    name = cfg.run_name or f"{cfg.objective}-{Path(cfg.data).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(cfg.output) if cfg.output else Path("runs") / name
    record = _previous_run(out, name)
    resumed = _resume_point(cfg, out, name) if record is not None else None
    finished = (out / "summary.json").is_file() and (resumed is None or resumed[0] == cfg.epochs)
    if finished:  # (with no checkpoint left to continue from, its summary stands)
        print(f"run '{name}' already finished: {out / 'summary.json'} (more --epochs continue it, "
              "a new --run-name trains again)")
        summary = json.loads((out / "summary.json").read_text())
        return _register_finished(cfg, summary, _open_tracker(cfg, record, out, name), out) \
            if cfg.register else summary
    tracker = _open_tracker(cfg, record, out, name)
    if resumed is not None and resumed[1].changed:
        epoch, changes = resumed
        print(f"resuming at epoch {epoch} with changed settings (applied): {changes.describe()}", flush=True)
        tracker.set_tags({f"resumed_at_epoch_{epoch}": changes.describe()})
    with tracker.ending():
        fit_started = time.perf_counter()
        trained = fit(cfg, source, data, tracker, out, name)
        fit_seconds = time.perf_counter() - fit_started
        state = trained.checkpoint
        write_atomic_dir(out / "checkpoint", lambda d: save_checkpoint(state, d))
        found = final_assignments(state, source)
        scores = clustering_scores(found, source.labels)
        log_model_and_plots(tracker, state, out, source, found)
        registered = _register(cfg, tracker, out, state["epoch"])
        summary = _summary(cfg, source, state, scores, tracker, out, trained.starts,
                           wall=time.perf_counter() - started, fit_seconds=fit_seconds)
        summary["mlflow"].update(registered)
        tracker.log_metrics({f"final/{k}": v for k, v in scores.items()}, step=cfg.epochs)
        write_json_atomic(out / "summary.json", summary)
        tracker.log_artifact(out / "summary.json")
    _print_result(summary, out)
    return summary


def _register(cfg: Config, tracker: RunTracker, out: Path, epoch: int) -> dict[str, str | None]:
    """--register NAME: a new version of NAME (models:/NAME@latest resolves to it), from a copy
    of out/model of its own: more epochs later re-export the run's `model`, never a version."""
    if not cfg.register:
        return {"registered_model": None, "version": None}
    if tracker.lost:
        print(f"warning: MLflow was lost; model not registered as {cfg.register}", file=sys.stderr)
        return {"registered_model": None, "version": None}
    copy = f"registered/epoch-{epoch:05d}"
    tracker.log_artifacts(out / "model", copy)
    version = register(tracker, cfg.register, copy)
    print(f"registered models:/{cfg.register}/{version} (models:/{cfg.register}@latest)")
    return {"registered_model": cfg.register, "version": version}


def _register_finished(cfg: Config, summary: dict[str, Any], tracker: RunTracker,
                       out: Path) -> dict[str, Any]:
    """--register on a run that had already finished: its model, registered now."""
    with tracker.ending():
        summary["mlflow"].update(_register(cfg, tracker, out, summary["epochs"]))
        write_json_atomic(out / "summary.json", summary)
        tracker.log_artifact(out / "summary.json")
    return summary


def _summary(cfg: Config, source: ImageSource, state: dict[str, Any], scores: dict[str, Any],
             tracker: RunTracker, out: Path, starts: list[dict[str, Any]], wall: float,
             fit_seconds: float) -> dict[str, Any]:
    labelled = source.labels is not None
    return {
        "objective": cfg.objective, "data": cfg.data, "num_samples": len(source),
        "clusters": cfg.clusters, "epochs": state["epoch"],
        "workers": starts[-1]["workers"] if cfg.elastic else cfg.workers,  # elastic: at the end
        "device": "cuda" if cfg.gpu else "cpu",
        "metrics": {k: scores[k] for k in ("acc", "nmi", "ari")} if labelled
        else {"acc": None, "nmi": None, "ari": None},
        "label_free": {k: scores[k] for k in ("view_mi", "balance", "largest_cluster",
                                              "clusters_used", "confidence")},
        "head": state["head"],
        "restarts": len(starts) - 1,
        "start_epochs": [s["epoch"] for s in starts],
        "resizes": resizes(starts),
        "wall_seconds": round(wall, 2),
        "fit_seconds": round(fit_seconds, 2),
        "train_images_per_second": round(statistics.median(
            h["train/images_per_second"] for h in state["history"]), 1),
        # the share of an epoch in which rank 0 alone worked (its reports and scoring), median
        "serial_share": round(statistics.median(
            h.get("train/serial_share", 0.0) for h in state["history"]), 4),
        # the largest peak resident memory of any worker process (since its last start)
        "worker_peak_rss_gib": round(state["history"][-1].get("train/peak_rss_gib", float("nan")), 2),
        "checkpoint": str((out / "checkpoint").resolve()),
        "config": cfg.to_dict(),
        "mlflow": {"tracking_uri": tracker.tracking_uri, "experiment_id": tracker.experiment_id,
                   "run_id": tracker.run_id, "model_uri": f"runs:/{tracker.run_id}/model",
                   "registered_model": None, "version": None, "lost": tracker.lost},
    }


def resizes(starts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The worker-group starts that changed its size: when (UTC), the epoch it resumed at, and
    the sizes before and after."""
    return [{"time": datetime.fromtimestamp(now["time"], UTC).isoformat(timespec="seconds"),
             "epoch": now["epoch"], "from": before["workers"], "to": now["workers"]}
            for before, now in itertools.pairwise(starts) if now["workers"] != before["workers"]]


def _print_result(summary: dict[str, Any], out: Path) -> None:
    m = summary["metrics"]
    scores = (f"ACC {m['acc']:.4f}  NMI {m['nmi']:.4f}  ARI {m['ari']:.4f}"
              if m["acc"] is not None else "no labels: see label_free in summary.json")
    print(f"{summary['objective']} on {summary['data']}: {scores}  "
          f"({summary['fit_seconds']:.0f} s training, {_workers(summary)})")
    print(f"summary: {out / 'summary.json'}   MLflow run: {summary['mlflow']['run_id']}")


def _workers(summary: dict[str, Any]) -> str:
    """`2 workers`; an elastic group says its range and any resizes: `2 workers, elastic 1-2,
    resized 2 -> 1 -> 2`."""
    config, changes, count = summary["config"], summary["resizes"], summary["workers"]
    said = f"{count} worker{'' if count == 1 else 's'}"
    if not isinstance(config["workers"], str):
        return said
    said += f", elastic {config['workers']}"
    if not changes:
        return said
    sizes = [changes[0]["from"], *(change["to"] for change in changes)]
    return f"{said}, resized {' -> '.join(map(str, sizes))}"


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, lambda: train(config_from_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

"""`python -m distcluster.train`: train a clustering network, log to MLflow, write summary.json.

With no arguments: IMC-SwAV on the embedded digits data with 2 local Ray workers.
Also the Ray Jobs entry point: `ray job submit -- python -m distcluster.train ...`.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from distcluster import config as configuration
from distcluster.augment import MultiCrop
from distcluster.checkpoint import (
    export_model,
    load_checkpoint,
    save_checkpoint,
    write_atomic_dir,
    write_json_atomic,
)
from distcluster.cli import ArgumentParser, run_command
from distcluster.config import Config
from distcluster.data import ImageSource
from distcluster.errors import ConfigError
from distcluster.loop import (
    WorkerContext,
    build_model,
    check_fits,
    evaluate,
    set_cpu_speedups,
    train_loop,
)
from distcluster.sources import open_source, resolve_data
from distcluster.tracking import RunTracker, resolve_tracking_uri

PROG = "distcluster.train"
KEEP_CHECKPOINTS = 2


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
    p.add_argument("--workers", type=int, help="Ray Train workers; 0 = in-process (default 2)")
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set optim.lr=1e-3 (repeatable)")
    p.add_argument("--output", help="output folder (default runs/<run-name>)")
    p.add_argument("--experiment", help="MLflow experiment (default distcluster)")
    p.add_argument("--run-name")
    p.add_argument("--register", metavar="MODEL_NAME", help="register the model in MLflow")
    p.add_argument("--tracking-uri", help="MLflow URI (default $MLFLOW_TRACKING_URI or "
                   "sqlite:///mlflow.db)")
    return p


FLAG_KEYS = ("data", "objective", "clusters", "epochs", "batch_size", "workers", "gpu", "seed",
             "output", "experiment", "run_name", "register", "tracking_uri")


def config_from_args(argv: list[str] | None) -> Config:
    """Recipe, then command-line flags, then --set overrides (later wins)."""
    args = build_parser().parse_args(argv)
    recipe = args.config or configuration.default_recipe(args.objective or "imc_swav",
                                                         args.data or "digits")
    values = configuration.load_recipe(recipe) if recipe else {}
    flags = {k: getattr(args, k) for k in FLAG_KEYS if getattr(args, k) is not None}
    values = configuration.merge(values, flags)
    for override in args.set:
        values = configuration.merge(values, configuration.parse_override(override))
    return configuration.from_dict(values)


class _LocalReporter:
    """--workers 0: log epochs to MLflow and keep the last checkpoints on local disk."""

    def __init__(self, tracker: RunTracker, folder: Path) -> None:
        self.tracker = tracker
        self.folder = folder
        self.latest: Path | None = None

    def epoch_end(self, epoch: int, metrics: dict[str, float], save: bool, checkpoint) -> None:
        self.tracker.log_metrics(metrics, step=epoch + 1)
        if not save:
            return
        state = checkpoint()
        self.latest = write_atomic_dir(self.folder / f"epoch-{epoch + 1:05d}",
                                       lambda d: save_checkpoint(state, d))
        for old in sorted(self.folder.glob("epoch-*"))[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old)


def fit(cfg: Config, source: ImageSource, data: str, tracker: RunTracker, out: Path,
        name: str) -> tuple[Path, int]:
    """Train with Ray workers, or in-process for --workers 0; the last checkpoint folder."""
    if cfg.workers == 0:
        reporter = _LocalReporter(tracker, out / "checkpoints")
        device = torch.device("cuda" if cfg.gpu else "cpu")
        train_loop(cfg, source, WorkerContext(device=device), reporter)
        return reporter.latest, 0
    from distcluster import ray_train

    outcome = ray_train.fit(cfg, data, {"uri": tracker.tracking_uri, "run_id": tracker.run_id},
                            out / "ray", name)
    return outcome.checkpoint_dir, outcome.restarts


def final_scores(state: dict[str, Any], source: ImageSource) -> dict[str, Any]:
    cfg = configuration.from_dict(state["config"])
    model = build_model(cfg, source.channels)
    model.load_state_dict(state["model"])
    augment = MultiCrop(cfg.augment, state["input"]["mean"], state["input"]["std"])
    return evaluate(model, source, augment, torch.device("cpu"), state["head"])


def train(cfg: Config) -> dict[str, Any]:
    started = time.perf_counter()
    set_cpu_speedups()
    data = resolve_data(cfg.data)
    source = open_source(data, cfg.max_samples)
    check_fits(cfg, source)
    if cfg.gpu and cfg.workers == 0 and not torch.cuda.is_available():
        # With Ray workers the GPUs may live on other nodes: Ray then waits for them.
        raise ConfigError("gpu", True, "no CUDA GPU is visible to this process (use --no-gpu)")
    name = cfg.run_name or f"{cfg.objective}-{Path(cfg.data).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(cfg.output) if cfg.output else Path("runs") / name
    tracker = RunTracker.start(resolve_tracking_uri(cfg.tracking_uri), cfg.experiment, name,
                               tags={"objective": cfg.objective, "data": cfg.data})
    tracker.log_params(cfg.flat())
    try:
        fit_started = time.perf_counter()
        checkpoint_dir, restarts = fit(cfg, source, data, tracker, out, name)
        fit_seconds = time.perf_counter() - fit_started
        state = load_checkpoint(checkpoint_dir)
        write_atomic_dir(out / "checkpoint", lambda d: save_checkpoint(state, d))
        write_atomic_dir(out / "model", lambda d: export_model(state, d))
        tracker.log_artifacts(out / "model", "model")
        scores = final_scores(state, source)
        summary = _summary(cfg, source, state, scores, tracker, out, restarts,
                           wall=time.perf_counter() - started, fit_seconds=fit_seconds)
        tracker.log_metrics({f"final/{k}": v for k, v in scores.items()}, step=cfg.epochs)
        write_json_atomic(out / "summary.json", summary)
        tracker.log_artifact(out / "summary.json")
    except BaseException:
        tracker.finish("FAILED")
        raise
    tracker.finish()
    _print_result(summary, out)
    return summary


def _summary(cfg: Config, source: ImageSource, state: dict[str, Any], scores: dict[str, Any],
             tracker: RunTracker, out: Path, restarts: int, wall: float,
             fit_seconds: float) -> dict[str, Any]:
    labelled = source.labels is not None
    speeds = [m.value for m in tracker.client.get_metric_history(tracker.run_id,
                                                                 "train/images_per_second")]
    return {
        "objective": cfg.objective, "data": cfg.data, "num_samples": len(source),
        "clusters": cfg.clusters, "epochs": state["epoch"], "workers": cfg.workers,
        "device": "cuda" if cfg.gpu else "cpu",
        "metrics": {k: scores[k] for k in ("acc", "nmi", "ari")} if labelled
        else {"acc": None, "nmi": None, "ari": None},
        "label_free": {k: scores[k] for k in ("balance", "largest_cluster", "clusters_used",
                                              "confidence")},
        "head": state["head"],
        "restarts": restarts,
        "wall_seconds": round(wall, 2),
        "fit_seconds": round(fit_seconds, 2),
        "train_images_per_second": round(statistics.median(speeds), 1) if speeds else None,
        "checkpoint": str((out / "checkpoint").resolve()),
        "config": cfg.to_dict(),
        "mlflow": {"tracking_uri": tracker.tracking_uri, "experiment_id": tracker.experiment_id,
                   "run_id": tracker.run_id, "model_uri": f"runs:/{tracker.run_id}/model",
                   "registered_model": None, "version": None},
    }


def _print_result(summary: dict[str, Any], out: Path) -> None:
    m = summary["metrics"]
    scores = (f"ACC {m['acc']:.4f}  NMI {m['nmi']:.4f}  ARI {m['ari']:.4f}"
              if m["acc"] is not None else "no labels: see label_free in summary.json")
    print(f"{summary['objective']} on {summary['data']}: {scores}  "
          f"({summary['fit_seconds']:.0f} s training, {summary['workers']} workers)")
    print(f"summary: {out / 'summary.json'}   MLflow run: {summary['mlflow']['run_id']}")


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, lambda: train(config_from_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

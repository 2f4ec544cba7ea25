"""Ray Train wiring: a TorchTrainer whose workers run distcluster.loop.train_loop.

The only Ray lines are here: resources, the worker entry point, and
`ray.train.report` with a checkpoint from rank 0 after every epoch.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from distcluster.checkpoint import save_checkpoint
from distcluster.config import Config, from_dict
from distcluster.loop import WorkerContext, set_cpu_speedups, train_loop
from distcluster.sources import open_source
from distcluster.tracking import RunTracker


@dataclass
class FitOutcome:
    checkpoint_dir: Path
    restarts: int


def init_ray() -> None:
    """Join RAY_ADDRESS when set (as under `ray job submit`), else start a local instance."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
    else:
        ray.init(configure_logging=False)


def cpus_per_worker(cfg: Config) -> float:
    """Fit the workers onto the cluster: 1 CPU each when there is room, else a fraction
    (two workers on a 2-core laptop), keeping half a core for the driver and controller."""
    if cfg.cpus_per_worker:
        return cfg.cpus_per_worker
    total = ray.cluster_resources().get("CPU", 1.0)
    return min(1.0, max(0.1, (total - 0.5) / cfg.workers))


class _RayReporter:
    def __init__(self, rank: int, tracking: dict[str, str]) -> None:
        self.tracker = RunTracker(tracking["uri"], tracking["run_id"]) if rank == 0 else None

    def epoch_end(self, epoch: int, metrics: dict[str, float], save: bool, checkpoint) -> None:
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step=epoch + 1)
        if not save:  # every rank skips the same epochs, so reports stay in step
            return
        if checkpoint is None:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(checkpoint(), Path(folder))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))


def _train_worker(loop_config: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker."""
    # Ray Train 2.60 logs a line per report per rank through loggers named by file
    # path, which its own log-level filter misses; quiet them at the root.
    logging.getLogger().setLevel(logging.WARNING)
    context = ray.train.get_context()
    torch.set_num_threads(loop_config["threads"])
    set_cpu_speedups()
    cfg = from_dict(loop_config["config"])
    source = open_source(loop_config["data"], cfg.max_samples, loop_config["threads"])
    ctx = WorkerContext(context.get_world_rank(), context.get_world_size(),
                        ray.train.torch.get_device())
    train_loop(cfg, source, ctx, _RayReporter(ctx.rank, loop_config["tracking"]))


def fit(cfg: Config, data: str, tracking: dict[str, str], storage: Path, name: str) -> FitOutcome:
    """Train on Ray workers; `data` is what sources.resolve_data returned for cfg.data."""
    init_ray()
    cpus = cpus_per_worker(cfg)
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"config": cfg.to_dict(), "data": data, "tracking": tracking,
                           "threads": max(1, int(cpus))},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpu,
                                     resources_per_worker={"CPU": cpus}),
        torch_config=TorchConfig(backend="nccl" if cfg.gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=str(storage.resolve()),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=0),
                             # Ray's INFO lines (one per report per rank) would drown the epochs.
                             logging_config=ray.LoggingConfig(log_level="WARNING")),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train finished without a checkpoint: {result.error}")
    return FitOutcome(Path(result.checkpoint.path), restarts=0)

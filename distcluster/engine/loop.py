"""The per-worker training loop: the same code for 0, 1 or N workers.

Ray-free: the edge hands in a WorkerContext (rank, world size, device) and a
Reporter that receives an EpochReport after every epoch. Under an initialised
process group the model is wrapped in DDP and every batch statistic of the
objective is global (see distcluster.core.distributed). The pieces live next door:
build (model, optimiser, state), step (one update, skipping non-finite ones),
evaluation (scores of whole images).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from distcluster.common.errors import ResumeRefused
from distcluster.config import Config, resume_changes
from distcluster.core import distributed as dist
from distcluster.core.objectives import ObjectiveResult
from distcluster.core.objectives.prior import estimate_weight
from distcluster.data.arrays import ImageSource, subset_indices
from distcluster.data.augment import MultiCrop
from distcluster.engine.build import WorkerContext, build_training_state, check_fits, input_spec
from distcluster.engine.evaluation import EVAL_BATCH, Assignments, assign_shared, epoch_scores
from distcluster.engine.step import TrainingState, train_step

PRIOR_SAMPLE = 4096  # images whose features refit the prior (estimated or calibrated) each epoch


@dataclass(frozen=True)
class EpochReport:
    """What every rank hands its Reporter after an epoch. `save` and `evaluated` are the
    same on every rank; `metrics` hold the evaluation (on rank 0) when `evaluated`."""

    epoch: int  # the finished epoch, counted from 0
    metrics: dict[str, float]
    save: bool  # this epoch keeps a checkpoint
    evaluated: bool
    checkpoint: Callable[[], dict[str, Any]] | None  # rank 0 only: the checkpoint's contents


class Reporter(Protocol):
    def epoch_end(self, report: EpochReport) -> None:
        """Called on every rank after every epoch."""


class EpochLogs:
    """Sums detached per-step values of the finite steps on the device; one host sync per
    epoch, not per step."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.head_losses: torch.Tensor | None = None
        self.finite_steps: torch.Tensor | float = 0.0
        self.steps = 0

    def add(self, result: ObjectiveResult, finite: torch.Tensor) -> None:
        self.steps += 1
        self.finite_steps = self.finite_steps + finite
        for key, value in {"loss": result.loss.detach(), **result.logs}.items():
            self.sums[key] = self.sums.get(key, 0) + _kept(value.float(), finite)
        if result.subhead_losses is not None:
            h = _kept(result.subhead_losses.detach().float(), finite)
            self.head_losses = h if self.head_losses is None else self.head_losses + h

    def means(self) -> tuple[dict[str, float], torch.Tensor | None, int]:
        """Averaged over finite steps and ranks, and the number of skipped steps."""
        keys = sorted(self.sums)
        done = float(self.finite_steps)
        if not keys or done == 0:  # every step of the epoch was skipped (on every rank alike)
            return {}, None, self.steps
        packed = torch.stack([self.sums[k] for k in keys]) / done
        packed = (dist.all_reduce_(packed) / dist.world_size()).cpu()
        heads = None
        if self.head_losses is not None:
            heads = (dist.all_reduce_(self.head_losses / done) / dist.world_size()).cpu()
        metrics = {f"train/{k}": float(v) for k, v in zip(keys, packed, strict=True)}
        return metrics, heads, self.steps - round(done)


def _kept(value: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """value where the step counted, else 0 (also when value is NaN or infinite)."""
    return torch.where(finite > 0, value, torch.zeros_like(value))


def augmentation_generator(seed: int, rank: int, epoch: int) -> torch.Generator:
    """Augmentation draws depend only on (seed, rank, epoch): a resumed run repeats them exactly."""
    return torch.Generator().manual_seed((seed * 1_000 + rank) * 100_003 + epoch)


def _injected_nan_steps() -> set[int]:
    """Test-only hook: DISTCLUSTER_TEST_NAN_STEPS="3,4,5" turns those steps' loss into NaN."""
    value = os.environ.get("DISTCLUSTER_TEST_NAN_STEPS", "")
    return {int(v) for v in value.split(",") if v.strip()}


def _pause_after_epoch() -> int:
    """Test-only hook: DISTCLUSTER_TEST_PAUSE_AFTER_EPOCH=N waits for ever once epoch N is reported
    (its checkpoint written), so that a test can kill the run at a known place."""
    return int(os.environ.get("DISTCLUSTER_TEST_PAUSE_AFTER_EPOCH", "0") or 0)


def train_loop(cfg: Config, source: ImageSource, ctx: WorkerContext, reporter: Reporter,
               log: Callable[[str], None] = print, start: dict[str, Any] | None = None) -> None:
    """Train this rank's shards from `start` (a checkpoint state) or from scratch; report each epoch."""
    check_fits(cfg, source)
    if start is not None:  # the normalisation the checkpoint was trained with
        resume_changes(start["config"], cfg, start["epoch"])  # refuses what the state cannot take
        if start["input"]["channels"] != source.channels:
            raise ResumeRefused("data", cfg.data, f"{source.channels}-channel images; the checkpoint being "
                              f"resumed was trained on {start['input']['channels']}-channel ones")
        mean, std = start["input"]["mean"], start["input"]["std"]
    else:
        mean, std = source.channel_stats()
    augment = MultiCrop(cfg.augment, mean, std)
    state = build_training_state(cfg, source.channels, ctx, start)
    spec = input_spec(source, mean, std)
    report_seconds, cycle_started = 0.0, time.perf_counter()
    while state.epoch < cfg.epochs:
        metrics = _train_epoch(state, source, augment, ctx)
        last = state.epoch == cfg.epochs
        evaluated = last or _every(cfg.eval_every, state.epoch - 1)
        found, scores, scoring_seconds = None, {}, 0.0
        if evaluated:
            found, scores, scoring_seconds = _evaluate(state, source, augment, log)
        metrics.update(scores)
        metrics["train/peak_rss_gib"] = _largest_peak_memory_gib(state.device)
        now = time.perf_counter()
        if ctx.rank == 0:  # rank 0 alone: the last report (MLflow, checkpoint) and the scoring
            metrics["train/serial_share"] = (report_seconds + scoring_seconds) / (now - cycle_started)
            log(f"epoch {state.epoch}/{cfg.epochs} " + " ".join(
                f"{k.split('/')[1]}={v:.4g}" for k, v in metrics.items()
                if k in ("train/loss", "eval/acc", "eval/nmi", "train/images_per_second")))
        state.history.append(metrics)
        save = last or _every(cfg.checkpoint_every, state.epoch - 1)
        checkpoint = _checkpoint_maker(state, spec, found if last else None) if ctx.rank == 0 else None
        reporter.epoch_end(EpochReport(state.epoch - 1, metrics, save, evaluated, checkpoint))
        report_seconds, cycle_started = time.perf_counter() - now, now
        if state.epoch == _pause_after_epoch():
            threading.Event().wait()
    log(f"rank {ctx.rank} of {ctx.world_size}: done, {state.epoch} epochs, {state.step} steps")


def _evaluate(state: TrainingState, source: ImageSource, augment: MultiCrop,
              log: Callable[[str], None]) -> tuple[Assignments | None, dict[str, float], float]:
    """Every rank assigns its share, rank 0 scores them: the assignments and `eval/` metrics on
    rank 0 (None and {} on the others), and the seconds rank 0 spent scoring alone."""
    started = time.perf_counter()
    found = assign_shared(state.model, source, augment, state.device, state.head)
    if found is None:
        return None, {}, 0.0
    scoring = time.perf_counter()
    scores = epoch_scores(state, found, source.labels, log)
    now = time.perf_counter()
    return found, {**scores, "eval/seconds": now - started}, now - scoring


def _checkpoint_maker(state: TrainingState, spec: dict[str, Any],
                      found: Assignments | None) -> Callable[[], dict[str, Any]]:
    """The checkpoint's contents, made when the reporter saves it; the final one also keeps the
    last evaluation's assignments, so that the end of the run need not pass over the data again."""
    if found is None:
        return lambda: state.checkpoint(spec)
    return lambda: {**state.checkpoint(spec), "assignments": found.as_tensors()}


def _train_epoch(state: TrainingState, source: ImageSource, augment: MultiCrop,
                 ctx: WorkerContext) -> dict[str, float]:
    """One pass over this rank's shard; the epoch's `train/` metrics (the same on every rank)."""
    cfg, epoch = state.cfg, state.epoch
    started = time.perf_counter()
    logs = EpochLogs()
    local_batch = cfg.batch_size // ctx.world_size
    inject = _injected_nan_steps()
    gen = augmentation_generator(cfg.seed, ctx.rank, epoch)
    batches = source.epoch_batches(epoch, cfg.batch_size, ctx.world_size, ctx.rank, cfg.seed)
    with contextlib.closing(batches):  # closed (FFCV's reader too) when steps_per_epoch cuts it short
        for images in itertools.islice(batches, cfg.steps_per_epoch or None):
            crops = augment(images.to(ctx.device, non_blocking=True), gen)
            if state.speed.channels_last:
                crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]
            logs.add(*train_step(state, crops, local_batch, state.step in inject))
    state.guard.raise_if_diverged(state.step, epoch + 1)
    if cfg.prior != "uniform":  # every rank refits (no one waits); rank 0's target and shift are broadcast
        refit_prior(state, source, augment)
    dist.broadcast_buffers(state.model)  # every rank now holds rank 0's model: one checkpoint for all
    state.epoch += 1
    metrics, head_losses, skipped = logs.means()
    if head_losses is not None:
        state.head = int(head_losses.argmin())  # lowest-loss sub-head, chosen without labels
    elapsed = time.perf_counter() - started
    metrics.update({"train/images_per_second": logs.steps * cfg.batch_size / elapsed,
                    "train/epoch_seconds": elapsed, "train/lr": state.lr,
                    "train/head": state.head, "train/skipped_steps": skipped,
                    **state.model.objective.prior.profile_metrics()})
    return metrics


@torch.no_grad()
def refit_prior(state: TrainingState, source: ImageSource, augment: MultiCrop) -> None:
    """`prior: estimated` or `calibrated`: a new profile of the cluster sizes from the backbone
    features of a fixed sample of PRIOR_SAMPLE images; under `calibrated` the heads'
    assignments are calibrated on the same sample (core/objectives/prior.py)."""
    sample = source.take(subset_indices(len(source), PRIOR_SAMPLE)).to(state.device)
    objective = state.model.objective
    state.model.eval()  # the heads' batch norms too
    features = torch.cat([state.model.backbone(augment.whole(x)).float() for x in sample.split(EVAL_BATCH)])
    if state.cfg.prior == "calibrated":
        probs = torch.cat([objective.cluster_probs(f) for f in features.split(EVAL_BATCH)], 1)  # (S, n, K)
        objective.prior.calibrate(probs)
    state.model.train()
    weight = estimate_weight(state.epoch + 1, state.cfg.epochs)
    generator = torch.Generator().manual_seed(state.cfg.seed * 1_000 + state.epoch)
    objective.prior.update(features, weight, generator)


def _largest_peak_memory_gib(device: torch.device) -> float:
    """The largest peak resident memory (GiB) of any rank's process so far (collective)."""
    peak = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20],  # KiB to GiB
                        dtype=torch.float64, device=device)
    return float(dist.all_reduce_(peak, "max"))


def _every(period: int, epoch: int) -> bool:
    return period > 0 and (epoch + 1) % period == 0

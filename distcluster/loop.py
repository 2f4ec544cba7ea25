"""The per-worker training loop: the same code for 0, 1 or N workers.

Ray-free: the edge hands in a WorkerContext (rank, world size, device) and
a Reporter that receives each epoch's metrics and checkpoint state. Under an
initialised process group the model is wrapped in DDP and every batch
statistic of the objective is global (see distcluster.distributed).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from distcluster import distributed as dist
from distcluster.augment import PROBE_SEED, MultiCrop
from distcluster.config import Config, SpeedConfig
from distcluster.data import ImageSource, image_size
from distcluster.errors import ConfigError, TrainingDiverged
from distcluster.metrics import cluster_scores, label_free_scores, view_mi
from distcluster.models import ClusterModel, build_backbone
from distcluster.objectives import CRLC, IIC, IMCSwAV


@dataclass
class WorkerContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")


class Reporter(Protocol):
    def epoch_end(self, epoch: int, metrics: dict[str, float], save: bool, evaluated: bool,
                  checkpoint: Callable[[], dict[str, Any]] | None) -> None:
        """Called on every rank after every epoch. `save` and `evaluated` (the same on every
        rank) say whether this epoch keeps a checkpoint and whether rank 0's metrics hold the
        evaluation; `checkpoint` is given on rank 0 only."""


def build_model(cfg: Config, channels: int) -> ClusterModel:
    backbone = build_backbone(cfg.model, channels)
    objective_cls, section = {"iic": (IIC, cfg.iic), "imc_swav": (IMCSwAV, cfg.imc_swav),
                              "crlc": (CRLC, cfg.crlc)}[cfg.objective]
    return ClusterModel(backbone, objective_cls(backbone.feature_dim, cfg.clusters, section))


def build_optimizer(cfg: Config, model: nn.Module,
                    fused: bool = False) -> tuple[torch.optim.Optimizer, Any]:
    """The optimiser (one fused kernel per step with `fused`) and its epoch-wise lr schedule."""
    o = cfg.optim
    # No weight decay on 1-D parameters (biases, BN), as in CRLC's code, unless decay_1d
    # (IMC-SwAV's code decays every parameter).
    decay = [p for p in model.parameters() if p.ndim > 1 or o.decay_1d]
    no_decay = [p for p in model.parameters() if p.ndim <= 1 and not o.decay_1d]
    groups = [{"params": decay, "weight_decay": o.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kernel = {"fused": True} if fused else {}
    if o.name == "sgd":
        optimizer = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, **kernel)
    else:
        cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
        optimizer = cls(groups, lr=o.lr, betas=o.betas, **kernel)

    def factor(epoch: int) -> float:
        warm = min(1.0, (epoch + 1) / o.warmup_epochs) if o.warmup_epochs else 1.0
        return warm * o.gamma ** sum(epoch >= m for m in o.milestones)

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast_for(cfg: Config, device: torch.device):
    """bf16 autocast (about 2x faster on CPU here, and on GPU) unless precision is fp32."""
    if cfg.precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@torch.no_grad()
def predict_probs(model: ClusterModel, source: ImageSource, augment: MultiCrop,
                  device: torch.device, batch: int = 1024, probe: bool = False) -> torch.Tensor:
    """(S, N, K) cluster probabilities of every sub-head on whole images, or with `probe` on
    copies perturbed by augment.PROBE (the same draws on every call)."""
    gen = torch.Generator().manual_seed(PROBE_SEED)
    model.eval()
    parts = [model.cluster_probs(augment.probe(x, gen) if probe else augment.whole(x)).cpu()
             for x in (images.to(device) for images in source.batches(batch))]
    model.train()
    return torch.cat(parts, dim=1)


def evaluate(model: ClusterModel, source: ImageSource, augment: MultiCrop,
             device: torch.device, head: int) -> dict[str, float]:
    """Label-free signals, plus ACC/NMI/ARI when the source has labels, for sub-head `head`."""
    probs = predict_probs(model, source, augment, device)[head].numpy()
    perturbed = predict_probs(model, source, augment, device, probe=True)[head].numpy()
    return scores_of(probs, source.labels, perturbed)


def scores_of(probs: np.ndarray, labels: torch.Tensor | None,
              perturbed: np.ndarray | None = None) -> dict[str, float]:
    """Label-free signals (with `perturbed`, the probe view's probabilities: view_mi), plus
    ACC/NMI/ARI when there are labels."""
    scores: dict[str, float] = dict(label_free_scores(probs))
    if perturbed is not None:
        scores["view_mi"] = view_mi(probs.argmax(1), perturbed.argmax(1), probs.shape[1])
    if labels is not None:
        scores.update(cluster_scores(labels.numpy(), probs.argmax(1)))
    return scores


class _EpochLogs:
    """Sums detached per-step values of the finite steps on the device; one host sync per
    epoch, not per step."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.head_losses: torch.Tensor | None = None
        self.finite_steps: torch.Tensor | float = 0.0
        self.steps = 0

    def add(self, result, finite: torch.Tensor) -> None:
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


def check_fits(cfg: Config, source: ImageSource) -> None:
    """Refuse, before any work starts, a config that cannot run on this data."""
    cfg.validate(image_size(source))
    if cfg.batch_size > len(source):
        raise ConfigError("batch_size", cfg.batch_size,
                          f"larger than the {len(source)} images of '{cfg.data}'")


@dataclass
class _State:
    """What changes while training; everything a checkpoint needs to continue exactly."""

    model: ClusterModel
    trained: nn.Module  # the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: Any
    speed: SpeedConfig  # resolved for the device
    guard: LossGuard
    epoch: int = 0  # epochs completed
    step: int = 0
    head: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # every epoch's metrics


def _build_state(cfg: Config, channels: int, ctx: WorkerContext,
                 start: dict[str, Any] | None) -> _State:
    speed = cfg.speed.resolved(ctx.device.type == "cuda")
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg, channels).to(ctx.device)
    if speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = build_optimizer(cfg, model, speed.fused_optimizer)
    guard = LossGuard(cfg.max_bad_steps, speed.check_every, speed.fused_optimizer, ctx.device)
    state = _State(model, model, optimizer, scheduler, speed, guard)
    if start is not None:
        model.load_state_dict(start["model"])
        optimizer.load_state_dict(start["optimizer"])
        scheduler.load_state_dict(start["scheduler"])
        state.epoch, state.step, state.head = start["epoch"], start["step"], start["head"]
        state.history = list(start["history"])
    if speed.compile:
        # A graph that fails to compile runs eagerly (with a warning) rather than ending the run.
        torch._dynamo.config.suppress_errors = True
        model.backbone.compile(dynamic=False)  # in place: state_dict keys stay the same
    if dist.is_distributed():
        state.model = model = _batchnorm_for(cfg, model, ctx.device)
        state.trained = _data_parallel(model, ctx.device)
    return state


def _batchnorm_for(cfg: Config, model: ClusterModel, device: torch.device) -> ClusterModel:
    """BatchNorm over the global batch (model.sync_batchnorm; auto: on GPUs) or per worker."""
    gpu = device.type == "cuda"
    wanted = cfg.model.sync_batchnorm
    if not (gpu if wanted == "auto" else wanted):
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model) if gpu else dist.global_batchnorm(model)


CPU_BUCKET_MB = 256  # ResNet-18's 45 MB of gradients and every smaller model: one bucket


def _data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP with one wait per collective that matters. Buffers are BatchNorm statistics:
    kept in step by SyncBatchNorm on GPUs, per worker on CPU, so rank 0's are not
    broadcast before every step. On GPUs gradients go in DDP's default buckets, sent
    while backward goes on; on CPU, where backward keeps the worker's cores busy, in
    one bucket: one wait per step instead of one per bucket."""
    if device.type == "cuda":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index],
                                                   forward_sync_buffers=False)
    return nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False,
                                               bucket_cap_mb=CPU_BUCKET_MB)


def augmentation_generator(seed: int, rank: int, epoch: int) -> torch.Generator:
    """Augmentation draws depend only on (seed, rank, epoch): a resumed run repeats them exactly."""
    return torch.Generator().manual_seed((seed * 1_000 + rank) * 100_003 + epoch)


def _injected_nan_steps() -> set[int]:
    """Test-only hook: DISTCLUSTER_TEST_NAN_STEPS="3,4,5" turns those steps' loss into NaN."""
    value = os.environ.get("DISTCLUSTER_TEST_NAN_STEPS", "")
    return {int(v) for v in value.split(",") if v.strip()}


class LossGuard:
    """Skips every step whose loss or gradient is not finite on some rank; gives up after `max_bad`
    such steps in a row.

    With a fused optimiser and check_every > 1 nothing waits for the device: the skip
    is the optimiser's own `found_inf` flag (its update and step count are left
    unchanged), the run of bad steps is counted on the device, and the host looks at
    it every `check_every` steps and at the end of each epoch. Otherwise the host
    looks at every step and skips the update itself.
    """

    def __init__(self, max_bad: int, check_every: int, fused: bool, device: torch.device) -> None:
        self.max_bad, self.check_every = max_bad, check_every
        self.on_device = fused and check_every > 1
        self.run = torch.zeros((), device=device)  # bad steps in a row, now
        self.worst = torch.zeros((), device=device)  # the longest such run since the last look

    def record(self, finite: torch.Tensor) -> None:
        self.run = (self.run + 1) * (1 - finite)
        self.worst = torch.maximum(self.worst, self.run)

    def look(self, step: int, epoch: int) -> None:
        """Raise TrainingDiverged if max_bad bad steps in a row happened (a host sync)."""
        worst = int(self.worst.item())
        self.worst = self.run.clone()
        if worst >= self.max_bad:
            raise TrainingDiverged(
                f"loss or gradients not finite for {worst} consecutive steps (by step {step}, "
                f"epoch {epoch}); the last good checkpoint is kept. Lower optim.lr or check the data.")


def _train_step(cfg: Config, state: _State, crops: list[torch.Tensor], local_batch: int,
                device: torch.device, poisoned: bool):
    """One optimiser step, skipped on every rank when any rank's loss or gradient is not
    finite. Returns the objective's result and the finite flag (a 0-d tensor, the same on
    every rank)."""
    state.model.objective_hook("on_step_start")
    warm_up_learning_rate(cfg, state)
    with autocast_for(cfg, device):
        result = state.trained(crops, local_batch, state.step, state.epoch)
    loss = result.loss * float("nan") if poisoned else result.loss
    state.optimizer.zero_grad(set_to_none=True)
    # A non-finite loss makes every gradient of its rank NaN, and DDP's averaging carries
    # that to every rank: all ranks read the same flag off their gradients, no collective.
    (loss * _one_or_nan(loss.detach())).backward()
    state.model.objective_hook("on_after_backward", state.step)
    finite = gradients_finite(state.model)
    state.step += 1
    guard = state.guard
    guard.record(finite)
    if guard.on_device:
        state.optimizer.found_inf = 1 - finite  # read by the fused kernel: skip when 1
        state.optimizer.step()
        if state.step % guard.check_every == 0:
            guard.look(state.step, state.epoch + 1)
    elif finite.item() == 1:
        state.optimizer.step()
    else:  # a good step cannot lengthen a bad run
        guard.look(state.step, state.epoch + 1)
    return result, finite


def warm_up_learning_rate(cfg: Config, state: _State) -> None:
    """During the first optim.warmup_steps updates the lr rises linearly to the schedule's,
    (step + 1) / warmup_steps of it, as IMC-SwAV's code does; the epoch schedule sets it
    again at every epoch's end."""
    warmup = cfg.optim.warmup_steps
    if state.step < warmup:
        scale = (state.step + 1) / warmup
        for group, lr in zip(state.optimizer.param_groups, state.scheduler.get_last_lr(), strict=True):
            group["lr"] = lr * scale


def _one_or_nan(value: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(value), 1.0, float("nan"))


def gradients_finite(model: nn.Module) -> torch.Tensor:
    """1.0 when every gradient is finite, else 0.0 (a 0-d tensor; no host sync)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.isfinite(torch.nn.utils.get_total_norm(grads)).float()


def collapse_threshold(cfg: Config) -> float:
    """Largest-cluster fraction taken as collapse: cfg.collapse_threshold, or 3x the balanced share."""
    return cfg.collapse_threshold or min(0.9, 3 / cfg.clusters)


def train_loop(cfg: Config, source: ImageSource, ctx: WorkerContext, reporter: Reporter,
               log: Callable[[str], None] = print, start: dict[str, Any] | None = None) -> None:
    """Train this rank's shards from `start` (a checkpoint state) or from scratch; report each epoch."""
    check_fits(cfg, source)
    if start is not None:  # the normalisation the checkpoint was trained with
        mean, std = start["input"]["mean"], start["input"]["std"]
    else:
        mean, std = source.channel_stats()
    augment = MultiCrop(cfg.augment, mean, std)
    state = _build_state(cfg, source.channels, ctx, start)
    local_batch = cfg.batch_size // ctx.world_size
    poison = _injected_nan_steps()
    while state.epoch < cfg.epochs:
        epoch = state.epoch
        started = time.perf_counter()
        logs = _EpochLogs()
        gen = augmentation_generator(cfg.seed, ctx.rank, epoch)
        for images in source.epoch_batches(epoch, cfg.batch_size, ctx.world_size, ctx.rank, cfg.seed):
            crops = augment(images.to(ctx.device, non_blocking=True), gen)
            if state.speed.channels_last:
                crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]
            logs.add(*_train_step(cfg, state, crops, local_batch, ctx.device, state.step in poison))
        state.guard.look(state.step, epoch + 1)
        state.scheduler.step()
        state.epoch += 1
        metrics, head_losses, skipped = logs.means()
        if head_losses is not None:
            state.head = int(head_losses.argmin())  # lowest-loss sub-head, chosen without labels
        elapsed = time.perf_counter() - started
        metrics.update({"train/images_per_second": logs.steps * cfg.batch_size / elapsed,
                        "train/epoch_seconds": elapsed, "train/lr": state.scheduler.get_last_lr()[0],
                        "train/head": state.head, "train/skipped_steps": skipped})
        last = state.epoch == cfg.epochs
        evaluated = last or _every(cfg.eval_every, epoch)
        if ctx.rank == 0 and evaluated:
            metrics.update(_evaluate_epoch(cfg, state, source, augment, ctx.device, log))
        state.history.append(metrics)
        if ctx.rank == 0:
            log(f"epoch {state.epoch}/{cfg.epochs} " + " ".join(
                f"{k.split('/')[1]}={v:.4g}" for k, v in metrics.items()
                if k in ("train/loss", "eval/acc", "eval/nmi", "train/images_per_second")))

        def checkpoint(state: _State = state, snapshot: tuple = (state.epoch, state.step, state.head)):
            epoch, step, head = snapshot
            return {"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
                    "scheduler": state.scheduler.state_dict(), "epoch": epoch, "step": step,
                    "head": head, "history": state.history[:epoch], "config": cfg.to_dict(),
                    "input": input_spec(source, mean, std)}
            # no sampler or RNG state: both derive from (seed, rank, epoch)

        reporter.epoch_end(epoch, metrics, last or _every(cfg.checkpoint_every, epoch), evaluated,
                           checkpoint if ctx.rank == 0 else None)


def _evaluate_epoch(cfg: Config, state: _State, source: ImageSource, augment: MultiCrop,
                    device: torch.device, log: Callable[[str], None]) -> dict[str, float]:
    scores = evaluate(state.model, source, augment, device, state.head)
    scores = {f"eval/{k}": v for k, v in scores.items()}
    largest, threshold = scores["eval/largest_cluster"], collapse_threshold(cfg)
    collapsed = state.epoch > cfg.collapse_after_epochs and largest > threshold
    if collapsed:
        log(f"warning: cluster collapse at epoch {state.epoch}: the largest cluster holds "
            f"{largest:.0%} of the images (threshold {threshold:.0%})")
    scores["eval/collapsed"] = float(collapsed)
    return scores


def _every(period: int, epoch: int) -> bool:
    return period > 0 and (epoch + 1) % period == 0


def input_spec(source: ImageSource, mean: list[float], std: list[float]) -> dict[str, Any]:
    """What predict needs to prepare images for this model."""
    return {"channels": source.channels, "size": list(source.image_shape),
            "mean": mean, "std": std, "class_names": source.class_names}


def set_cpu_speedups() -> None:
    # Sharpening cluster probabilities produce denormals that slow CPU math ~2x.
    torch.set_flush_denormal(True)
    keep_freed_memory()


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> None:
    """Let glibc keep the memory of freed activations for the next step. By default it gives
    large blocks back to the kernel and faults them in again, page by page, at the next step:
    on 2 CPU cores that was 10,000 to 200,000 page faults per training step and up to half of
    the time in the kernel. No-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        pass

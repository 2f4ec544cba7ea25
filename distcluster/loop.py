"""The per-worker training loop: the same code for 0, 1 or N workers.

Ray-free: the edge hands in a WorkerContext (rank, world size, device) and
a Reporter that receives each epoch's metrics and checkpoint state. Under an
initialised process group the model is wrapped in DDP and every batch
statistic of the objective is global (see distcluster.distributed).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from distcluster import distributed as dist
from distcluster.augment import MultiCrop
from distcluster.config import Config
from distcluster.data import ImageSource, image_size
from distcluster.errors import ConfigError
from distcluster.metrics import cluster_scores, label_free_scores
from distcluster.models import ClusterModel, build_backbone
from distcluster.objectives import CRLC, IIC, IMCSwAV


@dataclass
class WorkerContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")


class Reporter(Protocol):
    def epoch_end(self, epoch: int, metrics: dict[str, float], save: bool,
                  checkpoint: Callable[[], dict[str, Any]] | None) -> None:
        """Called on every rank after every epoch. `save` (the same on every rank) says
        whether this epoch keeps a checkpoint; `checkpoint` is given on rank 0 only."""


def build_model(cfg: Config, channels: int) -> ClusterModel:
    backbone = build_backbone(cfg.model, channels)
    objective_cls, section = {"iic": (IIC, cfg.iic), "imc_swav": (IMCSwAV, cfg.imc_swav),
                              "crlc": (CRLC, cfg.crlc)}[cfg.objective]
    return ClusterModel(backbone, objective_cls(backbone.feature_dim, cfg.clusters, section))


def build_optimizer(cfg: Config, model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    o = cfg.optim
    # No weight decay on 1-D parameters (biases, BN), as in CRLC's code.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": o.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if o.name == "sgd":
        optimizer = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
    else:
        cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
        optimizer = cls(groups, lr=o.lr, betas=o.betas)

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
                  device: torch.device, batch: int = 1024) -> torch.Tensor:
    """(S, N, K) cluster probabilities of every sub-head on whole images."""
    model.eval()
    parts = [model.cluster_probs(augment.whole(images.to(device))).cpu()
             for images in source.batches(batch)]
    model.train()
    return torch.cat(parts, dim=1)


def evaluate(model: ClusterModel, source: ImageSource, augment: MultiCrop,
             device: torch.device, head: int) -> dict[str, float]:
    """Label-free signals, plus ACC/NMI/ARI when the source has labels, for sub-head `head`."""
    probs = predict_probs(model, source, augment, device)[head].numpy()
    scores: dict[str, float] = dict(label_free_scores(probs))
    if source.labels is not None:
        scores.update(cluster_scores(source.labels.numpy(), probs.argmax(1)))
    return scores


class _EpochLogs:
    """Sums detached per-step values; one host sync per epoch, not per step."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.head_losses: torch.Tensor | None = None
        self.steps = 0

    def add(self, result) -> None:
        self.steps += 1
        for key, value in {"loss": result.loss.detach(), **result.logs}.items():
            self.sums[key] = self.sums.get(key, 0) + value.float()
        if result.subhead_losses is not None:
            h = result.subhead_losses.float()
            self.head_losses = h if self.head_losses is None else self.head_losses + h

    def means(self) -> tuple[dict[str, float], torch.Tensor | None]:
        """Averaged over steps and ranks."""
        keys = sorted(self.sums)
        packed = torch.stack([self.sums[k] for k in keys]) / max(1, self.steps)
        packed = dist.all_reduce_(packed.cpu()) / dist.world_size()
        heads = None
        if self.head_losses is not None:
            heads = dist.all_reduce_(self.head_losses.cpu() / self.steps) / dist.world_size()
        return {f"train/{k}": float(v) for k, v in zip(keys, packed, strict=True)}, heads


def check_fits(cfg: Config, source: ImageSource) -> None:
    """Refuse, before any work starts, a config that cannot run on this data."""
    cfg.validate(image_size(source))
    if cfg.batch_size > len(source):
        raise ConfigError("batch_size", cfg.batch_size,
                          f"larger than the {len(source)} images of '{cfg.data}'")


def train_loop(cfg: Config, source: ImageSource, ctx: WorkerContext, reporter: Reporter,
               log: Callable[[str], None] = print) -> None:
    """Train for cfg.epochs on this rank's shards; report every epoch."""
    check_fits(cfg, source)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    mean, std = source.channel_stats()
    augment = MultiCrop(cfg.augment, mean, std)
    model = build_model(cfg, source.channels).to(ctx.device)
    optimizer, scheduler = build_optimizer(cfg, model)
    trained = model
    if dist.is_distributed():
        if ctx.device.type == "cuda":  # SyncBatchNorm runs on GPUs only; on CPU BN stays per worker
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        trained = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000 + ctx.rank)  # augmentation draws
    local_batch = cfg.batch_size // ctx.world_size
    step = 0
    head = 0
    for epoch in range(cfg.epochs):
        started = time.perf_counter()
        logs = _EpochLogs()
        for images in source.epoch_batches(epoch, cfg.batch_size, ctx.world_size, ctx.rank, cfg.seed):
            crops = augment(images.to(ctx.device, non_blocking=True), gen)
            model.objective_hook("on_step_start")
            with autocast_for(cfg, ctx.device):
                result = trained(crops, local_batch, step)
            optimizer.zero_grad(set_to_none=True)
            result.loss.backward()
            model.objective_hook("on_after_backward", step)
            optimizer.step()
            logs.add(result)
            step += 1
        scheduler.step()
        metrics, head_losses = logs.means()
        if head_losses is not None:
            head = int(head_losses.argmin())  # lowest-loss sub-head, chosen without labels
        elapsed = time.perf_counter() - started
        metrics.update({"train/images_per_second": logs.steps * cfg.batch_size / elapsed,
                        "train/epoch_seconds": elapsed, "train/lr": scheduler.get_last_lr()[0],
                        "train/head": head})
        last = epoch == cfg.epochs - 1
        if ctx.rank == 0 and (last or _every(cfg.eval_every, epoch)):
            metrics.update({f"eval/{k}": v for k, v in
                            evaluate(model, source, augment, ctx.device, head).items()})
        if ctx.rank == 0:
            log(f"epoch {epoch + 1}/{cfg.epochs} " + " ".join(
                f"{k.split('/')[1]}={v:.4g}" for k, v in metrics.items()
                if k in ("train/loss", "eval/acc", "eval/nmi", "train/images_per_second")))

        def checkpoint(epoch: int = epoch, head: int = head) -> dict[str, Any]:
            return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "head": head,
                    "config": cfg.to_dict(), "input": input_spec(source, mean, std)}

        reporter.epoch_end(epoch, metrics, last or _every(cfg.checkpoint_every, epoch),
                           checkpoint if ctx.rank == 0 else None)


def _every(period: int, epoch: int) -> bool:
    return period > 0 and (epoch + 1) % period == 0


def input_spec(source: ImageSource, mean: list[float], std: list[float]) -> dict[str, Any]:
    """What predict needs to prepare images for this model."""
    return {"channels": source.channels, "size": list(source.image_shape),
            "mean": mean, "std": std, "class_names": source.class_names}


def set_cpu_speedups() -> None:
    # Sharpening cluster probabilities produce denormals that slow CPU math ~2x.
    torch.set_flush_denormal(True)

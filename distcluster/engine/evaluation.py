"""Each image's cluster, and the scores computed from them, on every worker.

Evaluation keeps, per image, what the scores and plots need: the chosen sub-head's cluster,
its probability (confidence) and the cluster of a perturbed copy (view_mi), 20 bytes an image,
never the (heads, N, K) probabilities. Under a process group each rank assigns its own
contiguous run of whole evaluation batches and rank 0 gathers the parts: the assignments are
those of one process, bit for bit (the same batches through the same weights, the perturbation
drawn per batch index), and each rank's memory is bounded by its share.

Label-free signals always (balance, largest cluster, confidence, agreement with a perturbed
copy); ACC/NMI/ARI when the images have labels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from distcluster import config as configuration
from distcluster.core import distributed as dist
from distcluster.core.metrics import cluster_scores, label_free_scores, view_mi
from distcluster.core.networks import ClusterModel
from distcluster.data.arrays import ImageSource
from distcluster.data.augment import PROBE_SEED, MultiCrop
from distcluster.engine.build import build_model
from distcluster.engine.step import TrainingState

EVAL_BATCH = 1024  # images per evaluation batch; ranks split the data at whole batches


@dataclass(frozen=True)
class Assignments:
    """Per image: its cluster, the probability of that cluster, and its perturbed copy's cluster."""

    clusters: np.ndarray  # (N,) int64
    confidence: np.ndarray  # (N,) float32
    perturbed: np.ndarray  # (N,) int64
    k: int

    @classmethod
    def joined(cls, parts: list[Assignments]) -> Assignments:
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                     ("clusters", "confidence", "perturbed")), max(p.k for p in parts))

    def as_tensors(self) -> dict[str, torch.Tensor | int]:
        """For a checkpoint (read back with torch.load(weights_only=True))."""
        return {"clusters": torch.from_numpy(self.clusters), "confidence": torch.from_numpy(self.confidence),
                "perturbed": torch.from_numpy(self.perturbed), "k": self.k}

    @classmethod
    def from_tensors(cls, saved: dict[str, Any]) -> Assignments:
        return cls(saved["clusters"].numpy(), saved["confidence"].numpy(), saved["perturbed"].numpy(),
                   int(saved["k"]))


def shard_range(count: int, world: int, rank: int, batch: int = EVAL_BATCH) -> tuple[int, int]:
    """Images [start, stop) that `rank` of `world` evaluates: a contiguous run of whole batches,
    the runs as equal as whole batches allow."""
    batches = -(-count // batch)
    first, last = batches * rank // world, batches * (rank + 1) // world
    return min(count, first * batch), min(count, last * batch)


@torch.no_grad()
def assign(model: ClusterModel, source: ImageSource, augment: MultiCrop, device: torch.device,
           head: int, start: int = 0, stop: int | None = None, batch: int = EVAL_BATCH) -> Assignments:
    """Assignments of images [start, stop) by sub-head `head`. The perturbation of batch i is
    drawn from (PROBE_SEED, i): with `start` and `stop` on batch boundaries (or `stop` the end),
    as shard_range gives them, an image gets the same result whichever range it is in."""
    stop = len(source) if stop is None else stop
    # Filled in place: small results kept between the batches' large temporaries would pin
    # glibc's heap (the process keeps freed memory, build.keep_freed_memory), and it grew by
    # about 10 KB an image over a pass (1.1 GB for 100,000 images); filled arrays keep it flat.
    count = max(0, stop - start)
    found = Assignments(np.empty(count, np.int64), np.empty(count, np.float32), np.empty(count, np.int64), 0)
    model.eval()
    batches = source.range_batches(start, stop, batch) if count else ()  # a rank may have none
    done, k = 0, 0
    for index, images in enumerate(batches, start=start // batch):
        x = images.to(device)
        probs = model.cluster_probs(augment.whole(x))[head]
        probe = augment.probe(x, torch.Generator().manual_seed(PROBE_SEED + index))
        best, k, rows = probs.max(dim=1), probs.shape[1], slice(done, done + len(x))
        found.clusters[rows] = best.indices.cpu().numpy()
        found.confidence[rows] = best.values.float().cpu().numpy()
        found.perturbed[rows] = model.cluster_probs(probe)[head].argmax(1).cpu().numpy()
        done += len(x)
    model.train()
    return dataclasses.replace(found, k=k)


def assign_shared(model: ClusterModel, source: ImageSource, augment: MultiCrop, device: torch.device,
                  head: int) -> Assignments | None:
    """Every image's assignments on rank 0 (None on the others), each rank assigning its share."""
    start, stop = shard_range(len(source), dist.world_size(), dist.rank())
    parts = dist.gather_to_first(assign(model, source, augment, device, head, start, stop))
    return None if parts is None else Assignments.joined(parts)


def clustering_scores(found: Assignments, labels: torch.Tensor | None) -> dict[str, float]:
    """Label-free signals of the assignments, plus ACC/NMI/ARI when there are labels."""
    scores: dict[str, float] = dict(label_free_scores(found.clusters, found.confidence, found.k))
    scores["view_mi"] = view_mi(found.clusters, found.perturbed, found.k)
    if labels is not None:
        scores.update(cluster_scores(labels.numpy(), found.clusters))
    return scores


def evaluate(model: ClusterModel, source: ImageSource, augment: MultiCrop,
             device: torch.device, head: int) -> dict[str, float]:
    """clustering_scores of sub-head `head` on every image of `source`, in this process."""
    return clustering_scores(assign(model, source, augment, device, head), source.labels)


def collapse_threshold(cfg: configuration.Config) -> float:
    """Largest-cluster fraction taken as collapse: cfg.collapse_threshold, or 3x the balanced share."""
    return cfg.collapse_threshold or min(0.9, 3 / cfg.clusters)


def epoch_scores(state: TrainingState, found: Assignments, labels: torch.Tensor | None,
                 log: Callable[[str], None]) -> dict[str, float]:
    """`eval/` scores of an epoch's assignments, with `eval/collapsed` (logged as a warning)."""
    cfg = state.cfg
    scores = {f"eval/{k}": v for k, v in clustering_scores(found, labels).items()}
    largest, threshold = scores["eval/largest_cluster"], collapse_threshold(cfg)
    collapsed = state.epoch > cfg.collapse_after_epochs and largest > threshold
    if collapsed:
        log(f"warning: cluster collapse at epoch {state.epoch}: the largest cluster holds "
            f"{largest:.0%} of the images (threshold {threshold:.0%})")
    scores["eval/collapsed"] = float(collapsed)
    return scores


def assign_checkpoint(checkpoint: dict[str, Any], source: ImageSource) -> Assignments:
    """Assignments of a checkpoint's chosen head on every image, as predict computes them; on
    the GPU when the run used one and this process sees one."""
    cfg = configuration.from_dict(checkpoint["config"])
    device = torch.device("cuda" if cfg.gpu and torch.cuda.is_available() else "cpu")
    model = build_model(cfg, source.channels)
    model.load_state_dict(checkpoint["model"])
    augment = MultiCrop(cfg.augment, checkpoint["input"]["mean"], checkpoint["input"]["std"])
    return assign(model.to(device), source, augment, device, checkpoint["head"])


def final_assignments(checkpoint: dict[str, Any], source: ImageSource) -> Assignments:
    """The assignments the run's last evaluation kept in its final checkpoint (no pass over the
    data), or one pass of assign_checkpoint for a checkpoint without them (an older version)
    or whose assignments are not of these images (a resumed run given other data)."""
    if "assignments" in checkpoint:
        kept = Assignments.from_tensors(checkpoint["assignments"])
        if len(kept.clusters) == len(source):
            return kept
    return assign_checkpoint(checkpoint, source)

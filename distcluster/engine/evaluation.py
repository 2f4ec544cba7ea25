"""Cluster probabilities of whole images, and the scores computed from them.

Label-free signals always (balance, largest cluster, confidence, agreement with a
perturbed copy); ACC/NMI/ARI when the images have labels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from distcluster import config as configuration
from distcluster.core.metrics import cluster_scores, label_free_scores, view_mi
from distcluster.core.networks import ClusterModel
from distcluster.data.arrays import ImageSource
from distcluster.data.augment import PROBE_SEED, MultiCrop
from distcluster.engine.build import build_model
from distcluster.engine.step import TrainingState


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


def clustering_scores(probs: np.ndarray, labels: torch.Tensor | None,
                      perturbed: np.ndarray | None = None) -> dict[str, float]:
    """Label-free signals of (N, K) probabilities (with `perturbed`, the probe copies'
    probabilities: view_mi), plus ACC/NMI/ARI when there are labels."""
    scores: dict[str, float] = dict(label_free_scores(probs))
    if perturbed is not None:
        scores["view_mi"] = view_mi(probs.argmax(1), perturbed.argmax(1), probs.shape[1])
    if labels is not None:
        scores.update(cluster_scores(labels.numpy(), probs.argmax(1)))
    return scores


def evaluate(model: ClusterModel, source: ImageSource, augment: MultiCrop,
             device: torch.device, head: int) -> dict[str, float]:
    """clustering_scores of sub-head `head` on every image of `source`."""
    probs = predict_probs(model, source, augment, device)[head].numpy()
    perturbed = predict_probs(model, source, augment, device, probe=True)[head].numpy()
    return clustering_scores(probs, source.labels, perturbed)


def collapse_threshold(cfg: configuration.Config) -> float:
    """Largest-cluster fraction taken as collapse: cfg.collapse_threshold, or 3x the balanced share."""
    return cfg.collapse_threshold or min(0.9, 3 / cfg.clusters)


def evaluate_epoch(state: TrainingState, source: ImageSource, augment: MultiCrop,
                   log: Callable[[str], None]) -> dict[str, float]:
    """`eval/` scores of the current head, with `eval/collapsed` (logged as a warning)."""
    cfg = state.cfg
    scores = evaluate(state.model, source, augment, state.device, state.head)
    scores = {f"eval/{k}": v for k, v in scores.items()}
    largest, threshold = scores["eval/largest_cluster"], collapse_threshold(cfg)
    collapsed = state.epoch > cfg.collapse_after_epochs and largest > threshold
    if collapsed:
        log(f"warning: cluster collapse at epoch {state.epoch}: the largest cluster holds "
            f"{largest:.0%} of the images (threshold {threshold:.0%})")
    scores["eval/collapsed"] = float(collapsed)
    return scores


def final_probs(checkpoint: dict[str, Any], source: ImageSource, probe: bool = False) -> np.ndarray:
    """(N, K) probabilities of a checkpoint's chosen head on every image, as predict computes
    them (with `probe`, on the label-free score's perturbed copies); on the GPU when the run
    used one and this process sees one."""
    cfg = configuration.from_dict(checkpoint["config"])
    device = torch.device("cuda" if cfg.gpu and torch.cuda.is_available() else "cpu")
    model = build_model(cfg, source.channels)
    model.load_state_dict(checkpoint["model"])
    augment = MultiCrop(cfg.augment, checkpoint["input"]["mean"], checkpoint["input"]["std"])
    return predict_probs(model.to(device), source, augment, device, probe=probe)[checkpoint["head"]].numpy()

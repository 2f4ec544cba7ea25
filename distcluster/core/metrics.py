"""Clustering metrics: Hungarian-matched accuracy, NMI, ARI, and label-free signals."""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping

import numpy as np
from numpy.typing import ArrayLike

# scipy is imported where it is used (every Ray worker and controller imports this module), and
# NMI and ARI are computed here from the contingency table as scikit-learn defines them (tests
# compare the two) rather than importing scikit-learn: docs/architecture.md has the cost.


def contingency(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """counts[c, k] = number of samples of class c put in cluster k."""
    classes = int(y_true.max()) + 1
    clusters = int(y_pred.max()) + 1
    counts = np.zeros((classes, clusters), dtype=np.int64)
    np.add.at(counts, (y_true, y_pred), 1)
    return counts


def hungarian_match(y_true: np.ndarray, y_pred: np.ndarray) -> dict[int, int]:
    """The one-to-one cluster -> class map that maximises agreement."""
    from scipy.optimize import linear_sum_assignment

    counts = contingency(y_true, y_pred)
    classes, clusters = linear_sum_assignment(counts, maximize=True)
    return {int(k): int(c) for c, k in zip(classes, clusters, strict=True)}


def normalized_mutual_info(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Mutual information of two labellings over the mean of their entropies (scikit-learn's
    `normalized_mutual_info_score`, arithmetic mean): 1 when both put every sample in one group,
    0 when they share no information."""
    return _nmi_of(_label_contingency(y_true, y_pred))


def mutual_information(joint: np.ndarray) -> float:
    """I(rows; cols) in nats of a joint distribution (R, C) that sums to 1 (numpy; the losses'
    torch form is core.information.weighted_information)."""
    outer = joint.sum(1, keepdims=True) @ joint.sum(0, keepdims=True)
    seen = joint > 0
    return float((joint[seen] * np.log(joint[seen] / outer[seen])).sum())


def _nmi_of(counts: np.ndarray) -> float:
    if counts.shape[0] == counts.shape[1] <= 1:
        return 1.0
    joint = counts / counts.sum()
    mutual = max(0.0, mutual_information(joint))
    if mutual == 0:
        return 0.0
    return mutual / ((_entropy(joint.sum(1)) + _entropy(joint.sum(0))) / 2)


def adjusted_rand_index(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Agreement over pairs of samples (same group in both, or different in both), adjusted for
    chance (scikit-learn's `adjusted_rand_score`): 1 for the same partition, about 0 for random."""
    return _ari_of(_label_contingency(y_true, y_pred))


def _ari_of(counts: np.ndarray) -> float:
    n = int(counts.sum())
    squares = int((counts**2).sum())
    per_class, per_cluster = counts.sum(1), counts.sum(0)
    same_both = squares - n  # ordered pairs together in both
    same_cluster_only = int((counts * per_cluster).sum()) - squares
    same_class_only = int((counts * per_class[:, None]).sum()) - squares
    apart_both = n * n - same_cluster_only - same_class_only - squares
    if same_cluster_only == same_class_only == 0:
        return 1.0
    return 2.0 * (same_both * apart_both - same_class_only * same_cluster_only) / (
        (same_both + same_class_only) * (same_class_only + apart_both)
        + (same_both + same_cluster_only) * (same_cluster_only + apart_both))


def _label_contingency(y_true: ArrayLike, y_pred: ArrayLike) -> np.ndarray:
    """counts[i, j] = samples with the i-th label of y_true and the j-th of y_pred, over the
    labels present (any values, negative ones too); (0, 0) for no samples."""
    true_ids = np.unique(np.asarray(y_true), return_inverse=True)[1].ravel()
    pred_ids = np.unique(np.asarray(y_pred), return_inverse=True)[1].ravel()
    if len(true_ids) != len(pred_ids):
        raise ValueError(f"{len(true_ids)} true labels but {len(pred_ids)} predicted")
    if len(true_ids) == 0:
        return np.zeros((0, 0), dtype=np.int64)
    return contingency(true_ids, pred_ids)


def _entropy(probabilities: np.ndarray) -> float:
    seen = probabilities[probabilities > 0]
    return float(-(seen * np.log(seen)).sum())


def cluster_scores(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, float]:
    """ACC (best one-to-one matching, Hungarian), NMI and ARI of a clustering."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} must be equal 1-D")
    from scipy.optimize import linear_sum_assignment

    counts = _label_contingency(y_true, y_pred)  # one table for the three scores
    matched = counts[linear_sum_assignment(counts, maximize=True)].sum()
    return {"acc": float(matched / len(y_true)), "nmi": _nmi_of(counts), "ari": _ari_of(counts)}


def label_free_scores(clusters: np.ndarray, confidence: np.ndarray, k: int) -> dict[str, float]:
    """Signals of clustering quality that need no labels, from each sample's cluster (N,) in
    0..k-1 and the probability the model gave it (N,).

    balance: entropy of cluster sizes / log K (1 = all equal); largest_cluster:
    fraction of samples in the biggest cluster; clusters_used: non-empty
    clusters; confidence: mean max probability.
    """
    sizes = np.bincount(clusters, minlength=k) / len(clusters)
    nonzero = sizes[sizes > 0]
    return {
        "balance": float(-(nonzero * np.log(nonzero)).sum() / math.log(k)),
        "largest_cluster": float(sizes.max()),
        "clusters_used": int((sizes > 0).sum()),
        "confidence": float(np.mean(confidence, dtype=np.float64)),
    }


def view_mi(clusters: np.ndarray, perturbed: np.ndarray, k: int) -> float:
    """Mutual information between each image's cluster and its perturbed copy's, over log K.

    Logged every evaluated epoch (ASHA compares running trials by it) and the weight
    of each trial in `consensus`: 1 for K equally large clusters that no perturbation
    changes; 0 for one cluster, or for assignments that ignore the image. It rewards
    balance and stability together and uses hard assignments (so sharper
    probabilities alone earn nothing). Merging classes makes clusters more stable,
    so on its own it favours too few clusters.
    """
    joint = np.zeros((k, k))
    np.add.at(joint, (np.asarray(clusters), np.asarray(perturbed)), 1.0)
    return mutual_information(joint / joint.sum()) / math.log(k)


def consensus(partitions: list[np.ndarray], weights: list[float]) -> list[float]:
    """For each partition of the same images, the mean NMI to every other partition,
    weighted by the others' `weights` (their view_mi): how much the sweep's stable
    models agree with it. Models with a wrong K merge or split different classes, so
    they agree less with the rest than models that found the data's own groups.
    With a single partition there is nothing to compare: 1."""
    n = len(partitions)
    nmi = np.ones((n, n))
    for i in range(n):
        for j in range(i + 1, n):
            nmi[i, j] = nmi[j, i] = normalized_mutual_info(partitions[i], partitions[j])
    w = np.asarray(weights, dtype=float)
    scores = []
    for i in range(n):
        others = np.arange(n) != i
        total = w[others].sum()
        scores.append(float((nmi[i, others] * w[others]).sum() / total) if total > 0 else 1.0)
    return scores


def selection_quality(label_free: list[float], acc: list[float], picked: int) -> dict[str, float | None]:
    """How well a label-free score ranks trials (one value of each list per trial) by ACC:
    Spearman's rho between the two (None with fewer than 3 trials or a constant list), the
    ACC of the trial picked without labels (index `picked`), the best ACC, and their gap."""
    from scipy.stats import spearmanr

    rho = float(spearmanr(label_free, acc).statistic) if len(acc) >= 3 else math.nan
    best = max(acc)
    return {"spearman": None if math.isnan(rho) else rho, "picked_acc": acc[picked], "best_acc": best,
            "gap": best - acc[picked]}


def matched_sizes(y_true: np.ndarray, y_pred: np.ndarray, clusters: int) -> dict[str, np.ndarray]:
    """Each class's size (largest first: `classes`, `class_sizes`) beside the size of the cluster
    matched to it (`matched_sizes`, 0 where none is), and the sizes of the clusters matched to
    no class (`unmatched_sizes`, largest first): a split class shows as a matched cluster
    smaller than its class, a merge as one larger."""
    class_sizes = np.bincount(y_true)
    cluster_sizes = np.bincount(y_pred, minlength=clusters)
    cluster_of = {c: k for k, c in hungarian_match(y_true, y_pred).items()}
    classes = np.argsort(-class_sizes, kind="stable")
    matched = np.array([cluster_sizes[cluster_of[c]] if c in cluster_of else 0 for c in classes])
    unmatched = np.delete(cluster_sizes, list(cluster_of.values()))
    return {"classes": classes, "class_sizes": class_sizes[classes], "matched_sizes": matched,
            "unmatched_sizes": np.sort(unmatched)[::-1]}


def departure_from_equal(shares: ArrayLike) -> float:
    """Half the L1 distance between K size shares (summing to 1) and equal ones, 1/K each: 0
    for equal sizes, 1 - 1/K for one group holding everything."""
    shares = np.asarray(shares, dtype=float)
    return 0.5 * float(np.abs(shares - 1 / len(shares)).sum())


def size_error(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """How far the cluster sizes are from the class sizes, whichever cluster holds which
    class: half the L1 distance between the two sorted lists of fractions (0: the same sizes;
    at most 1 - 1/K for one cluster holding every image of K equal classes)."""
    classes = np.sort(np.bincount(y_true))[::-1] / len(y_true)
    clusters = np.sort(np.bincount(y_pred))[::-1] / len(y_pred)
    width = max(len(classes), len(clusters))
    return float(np.abs(np.pad(classes, (0, width - len(classes)))
                        - np.pad(clusters, (0, width - len(clusters)))).sum() / 2)


def stability_by_clusters(partitions: Mapping[int, list[np.ndarray]]) -> dict[int, float]:
    """For each number of clusters K, the mean adjusted mutual information (AMI, arithmetic
    normalisation) between every two of its partitions of the same images (runs that differ
    only in their seed): how reproducibly a model with K clusters groups the data. AMI is
    adjusted for chance (about 0 for unrelated partitions at any K), so the criterion does not
    favour many or few clusters by itself; with the wrong K, runs split a group or merge two in
    different ways and agree less. It replaced the mean ARI, which weighs agreement by pairs of
    images and so rewards the coarse splits of weakly separated data: over five sweeps (digits
    twice, digits 5-9, 5 CIFAR-10 classes, CIFAR-10) AMI picked K within 1 of the classes every
    time, ARI three times (benchmarks/RESULTS.md, choose-k sections). K with fewer than 2 runs:
    left out."""
    from sklearn.metrics import adjusted_mutual_info_score

    return {k: float(np.mean([adjusted_mutual_info_score(a, b)
                              for a, b in itertools.combinations(runs, 2)]))
            for k, runs in sorted(partitions.items()) if len(runs) >= 2}


def recommended_clusters(stability: Mapping[int, float]) -> int:
    """The K whose runs agree most (ties: the smaller K)."""
    return max(sorted(stability), key=lambda k: stability[k])


def matched_confusion(y_true: np.ndarray, y_pred: np.ndarray, clusters: int) -> tuple[np.ndarray, list[int]]:
    """counts[class, column] and the cluster id of each column: columns are clusters reordered
    so that the cluster matched to class c comes c-th (unmatched clusters follow), making the
    diagonal the agreement ACC counts. The ids are the model's own, as in every other output."""
    counts = contingency(np.asarray(y_true), np.asarray(y_pred))
    counts = np.pad(counts, ((0, 0), (0, max(0, clusters - counts.shape[1]))))
    matched = sorted(hungarian_match(y_true, y_pred).items(), key=lambda kc: kc[1])
    order = [k for k, _ in matched]
    order += [k for k in range(counts.shape[1]) if k not in order]
    return counts[:, order], order

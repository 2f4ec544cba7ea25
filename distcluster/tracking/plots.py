"""Pictures a person would rather look at than read: cluster galleries, cluster sizes,
learning curves and confusion matrices. Each function writes one PNG (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from distcluster.data.arrays import ImageSource


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


MAX_SHOWN_CLUSTERS = 40  # galleries and bar charts of more clusters show the largest ones


def shown_clusters(clusters: np.ndarray, k: int, limit: int = MAX_SHOWN_CLUSTERS) -> np.ndarray:
    """The clusters a picture shows: all k in id order, or past `limit` the `limit` largest,
    largest first (ties by id)."""
    if k <= limit:
        return np.arange(k)
    return np.argsort(-np.bincount(clusters, minlength=k), kind="stable")[:limit]


def most_confident(clusters: np.ndarray, confidence: np.ndarray, shown: np.ndarray,
                   per_cluster: int) -> list[np.ndarray]:
    """For each cluster id in `shown`, the indices of its most confident members (best first)."""
    order = np.argsort(-confidence, kind="stable")
    return [order[clusters[order] == c][:per_cluster] for c in shown]


def gallery(images: Mapping[int, np.ndarray] | np.ndarray, clusters: np.ndarray, confidence: np.ndarray,
            k: int, path: Path, per_cluster: int = 10) -> None:
    """One row per cluster (the MAX_SHOWN_CLUSTERS largest of more): its `per_cluster` most
    confident images. images[i]: (H, W, C) uint8 for at least those images (see most_confident),
    e.g. from data.gather_images. Drawn as one picture: a subplot per image took 1.5 s for 10
    clusters of digits, 11 s for 100."""
    plt = _pyplot()
    shown = shown_clusters(clusters, k)
    rows = most_confident(clusters, confidence, shown, per_cluster)
    grid = mosaic([[images[i] for i in members] for members in rows], per_cluster)
    cell_height = grid.shape[0] / len(shown)
    sizes = np.bincount(clusters, minlength=k)
    fig, ax = plt.subplots(figsize=(0.9 * per_cluster + 1, 0.9 * len(shown) + 0.5))
    ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255,
              interpolation="nearest")
    ax.set_yticks((np.arange(len(shown)) + 0.5) * cell_height - 0.5,
                  [f"{c} ({sizes[c]})" for c in shown], fontsize=8)
    ax.set_xticks([])
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    which = "" if len(shown) == k else f"; the {len(shown)} largest of {k} clusters"
    ax.set_title(f"most confident images per cluster (row: cluster, its size{which})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def mosaic(rows: list[list[np.ndarray]], columns: int, gap: int = 1) -> np.ndarray:
    """The images in a grid, one list a row and `columns` cells a row, with `gap` white pixels
    after each cell; empty cells white. Images: (H, W, C) uint8, all of one shape."""
    shapes = [image.shape for row in rows for image in row]
    if not shapes:
        raise ValueError("a mosaic needs at least one image")
    height, width, channels = shapes[0]
    grid = np.full((len(rows) * (height + gap), columns * (width + gap), channels), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row[:columns]):
            top, left = r * (height + gap), c * (width + gap)
            grid[top:top + height, left:left + width] = image
    return grid


def source_gallery(source: ImageSource, clusters: np.ndarray, confidence: np.ndarray, k: int,
                   path: Path) -> None:
    """The gallery of an ImageSource, reading only the images it shows."""
    from distcluster.data.arrays import gather_images

    shown = np.concatenate(most_confident(clusters, confidence, shown_clusters(clusters, k), per_cluster=10))
    gallery(gather_images(source, shown), clusters, confidence, k, path)


def cluster_sizes(clusters: np.ndarray, k: int, path: Path) -> None:
    """A bar per cluster; past MAX_SHOWN_CLUSTERS, every cluster's size by rank, largest first."""
    plt = _pyplot()
    counts = np.bincount(clusters, minlength=k)
    fig, ax = plt.subplots(figsize=(max(4, 0.4 * min(k, MAX_SHOWN_CLUSTERS)), 3))
    if k <= MAX_SHOWN_CLUSTERS:
        ax.bar(np.arange(k), counts)
        ax.set(xlabel="cluster")
    else:
        ax.plot(np.arange(1, k + 1), np.sort(counts)[::-1])
        ax.set(xlabel=f"cluster rank by size (of {k})")
    ax.axhline(len(clusters) / k, color="grey", linestyle="--", label="balanced")
    ax.set(ylabel="images", title="cluster sizes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sizes_against_classes(sizes: Mapping[str, np.ndarray], class_names: list[str], path: Path) -> None:
    """Bars of each class's size beside its matched cluster's (core.metrics.matched_sizes),
    largest class first, then the clusters matched to no class; at most MAX_SHOWN_CLUSTERS."""
    plt = _pyplot()
    shown = min(len(sizes["classes"]), MAX_SHOWN_CLUSTERS)
    extra = sizes["unmatched_sizes"][:max(0, MAX_SHOWN_CLUSTERS - shown)]
    fig, ax = plt.subplots(figsize=(max(4.5, 0.45 * (shown + len(extra))), 3.2))
    x = np.arange(shown)
    ax.bar(x - 0.2, sizes["class_sizes"][:shown], 0.4, color="grey", label="class")
    ax.bar(x + 0.2, sizes["matched_sizes"][:shown], 0.4, color="C0", label="its matched cluster")
    if len(extra):
        ax.bar(shown + np.arange(len(extra)), extra, 0.4, color="C1", label="cluster matched to no class")
    names = [class_names[c] if c < len(class_names) else str(c) for c in sizes["classes"][:shown]]
    ax.set_xticks(range(shown + len(extra)), names + [""] * len(extra), rotation=45, fontsize=7, ha="right")
    ax.set(ylabel="images", title="cluster sizes against class sizes")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def learning_curves(history: list[dict[str, float]], path: Path) -> None:
    """Training loss and, where evaluated, ACC/NMI and the largest cluster, per epoch."""
    plt = _pyplot()
    fig, (loss_ax, score_ax) = plt.subplots(1, 2, figsize=(9, 3))
    epochs = np.arange(1, len(history) + 1)
    loss_ax.plot(epochs, [h.get("train/loss", np.nan) for h in history])
    loss_ax.set(xlabel="epoch", ylabel="loss", title="training loss")
    for key in ("eval/acc", "eval/nmi", "eval/largest_cluster"):
        points = [(e, h[key]) for e, h in zip(epochs, history, strict=True) if key in h]
        if points:
            score_ax.plot(*zip(*points, strict=True), marker=".", label=key.split("/")[1])
    score_ax.set(xlabel="epoch", title="evaluation")
    score_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def held_out_curves(curves: dict[str, list[tuple[float, dict[str, float]]]], path: Path, ylabel: str) -> None:
    """ACC against wall-clock minutes, one line per run (`curves`: run -> [(minutes, scores)]);
    runs that share the name's first word (the recipe) share a colour."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    colours: dict[str, str] = {}
    for name, points in curves.items():
        colour = colours.setdefault(name.split()[0], f"C{len(colours)}")
        ax.plot([m for m, _ in points], [s["acc"] for _, s in points], marker=".", color=colour, label=name)
    ax.set(xlabel="minutes since start", ylabel=ylabel, ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def confusion(matrix: np.ndarray, class_names: list[str], cluster_ids: list[int], path: Path) -> None:
    """matrix: (classes, clusters) counts with clusters already ordered by their matched class;
    `cluster_ids`: the model's id of each column (the ids predict and the gallery show). Past
    MAX_SHOWN_CLUSTERS columns, the matched clusters and then the largest others are drawn."""
    plt = _pyplot()
    if matrix.shape[1] > MAX_SHOWN_CLUSTERS:
        matched = min(matrix.shape[0], MAX_SHOWN_CLUSTERS)
        largest = np.argsort(-matrix[:, matched:].sum(0), kind="stable")
        others = matched + largest[:MAX_SHOWN_CLUSTERS - matched]
        columns = np.concatenate([np.arange(matched), others])
        title = f"confusion matrix ({len(columns)} of {matrix.shape[1]} clusters: matched, then largest)"
        matrix, cluster_ids = matrix[:, columns], [cluster_ids[c] for c in columns]
    else:
        title = "confusion matrix"
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * matrix.shape[1] + 2), max(3, 0.45 * matrix.shape[0] + 1)))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        if value:
            ax.text(j, i, str(value), ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(class_names)), class_names, fontsize=8)
    ax.set_xticks(range(len(cluster_ids)), [str(k) for k in cluster_ids], fontsize=8)
    ax.set(xlabel="cluster id (ordered by the class it matches)", ylabel="class", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sweep(rows: list[dict], params: list[str], metric: str, path: Path) -> None:
    """One scatter per searched parameter: each trial's final `metric` against its value;
    trials stopped early are hollow. Non-numeric values are placed by their order."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(params), figsize=(3.2 * len(params), 3.0), squeeze=False)
    for ax, param in zip(axes[0], params, strict=True):
        values = [row.get(param) for row in rows]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        labels = sorted({str(v) for v in values})
        xs = values if numeric else [labels.index(str(v)) for v in values]
        for row, x in zip(rows, xs, strict=True):
            if row.get(metric) is None:
                continue
            done = row["status"] == "completed"
            ax.scatter(x, row[metric], s=36, facecolors="C0" if done else "none", edgecolors="C0")
        if not numeric:
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=7)
        elif min(values) > 0 and max(values) / min(values) >= 20:  # e.g. a loguniform lr
            ax.set_xscale("log")
        ax.set_xlabel(param, fontsize=8)
        ax.set_ylabel(metric, fontsize=8)
    fig.suptitle(f"{metric} per trial (hollow: stopped early)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def stability(by_k: Mapping[str, float], chosen: int, path: Path) -> None:
    """The stability of each number of clusters (tune's choice of K), the recommended one marked."""
    plt = _pyplot()
    ks = [int(k) for k in by_k]
    values = list(by_k.values())
    fig, ax = plt.subplots(figsize=(4.5, 3.0))
    ax.plot(ks, values, "o-", color="C0")
    ax.plot([chosen], [by_k[str(chosen)]], "o", color="C3", markersize=10, label=f"recommended: {chosen}")
    ax.set(xlabel="clusters (K)", ylabel="stability (mean AMI between seeds)", xticks=ks)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def label_free_vs_acc(points: Mapping[str, tuple[float, float]], picked: str, acc_name: str,
                      rho: float | None, path: Path) -> None:
    """Each finished trial's label-free score against its ACC, the trial picked without labels
    marked: a sweep whose score ranks trials well lies on a rising line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    xs, ys = zip(*points.values(), strict=True)
    ax.scatter(xs, ys, s=30, color="C0")
    ax.plot(*points[picked], "o", color="C3", markersize=10, label=f"picked without labels: {picked}")
    shown_rho = "n/a" if rho is None else f"{rho:.2f}"
    ax.set(xlabel="label-free score (consensus)", ylabel=acc_name,
           title=f"{len(points)} finished trials, Spearman {shown_rho}")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""What a finished run (a `train`, or one trial of a sweep) leaves next to its MLflow run: the
logged model under `model/` and its plots under `plots/`, in the run's folder and in MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distcluster.common.files import write_atomic_dir
from distcluster.core.metrics import matched_confusion, matched_sizes
from distcluster.data.arrays import ImageSource
from distcluster.engine.evaluation import Assignments
from distcluster.tracking import plots
from distcluster.tracking.logged_model import save_mlflow_model
from distcluster.tracking.runs import RunTracker


def log_model_and_plots(tracker: RunTracker, state: dict[str, Any], folder: Path,
                        source: ImageSource | None = None, found: Assignments | None = None) -> None:
    """folder/model (the MLflow model of checkpoint `state`) and folder/plots, both logged.
    The plots are the learning curves, and with `source` and its images' assignments `found`
    the gallery, the cluster sizes and (with labels) the confusion matrix and the cluster sizes
    against the class sizes."""
    write_atomic_dir(folder / "model", lambda d: save_mlflow_model(state, d))
    tracker.log_artifacts(folder / "model", "model")
    write_atomic_dir(folder / "plots", lambda d: draw_plots(state, d, source, found))
    tracker.log_artifacts(folder / "plots", "plots")


def draw_plots(state: dict[str, Any], folder: Path, source: ImageSource | None = None,
               found: Assignments | None = None) -> None:
    plots.learning_curves(state["history"], folder / "learning_curves.png")
    if source is None or found is None:
        return
    k, clusters, confidence = found.k, found.clusters, found.confidence
    plots.source_gallery(source, clusters, confidence, k, folder / "cluster_gallery.png")
    plots.cluster_sizes(clusters, k, folder / "cluster_sizes.png")
    if source.labels is not None:
        labels = source.labels.numpy()
        names = source.class_names or [str(c) for c in range(labels.max() + 1)]
        matrix, cluster_ids = matched_confusion(labels, clusters, k)
        plots.confusion(matrix, names, cluster_ids, folder / "confusion_matrix.png")
        sizes = matched_sizes(labels, clusters, k)
        plots.sizes_against_classes(sizes, names, folder / "sizes_against_classes.png")

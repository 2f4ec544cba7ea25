"""The stable import path of the clustering scores (docs/architecture.md); they live in
distcluster.core.metrics."""

from distcluster.core.metrics import adjusted_rand_index, cluster_scores, normalized_mutual_info

__all__ = ["adjusted_rand_index", "cluster_scores", "normalized_mutual_info"]

import itertools

import numpy as np
import pytest

from distcluster.core.metrics import (
    adjusted_rand_index,
    cluster_scores,
    departure_from_equal,
    label_free_scores,
    matched_sizes,
    normalized_mutual_info,
    recommended_clusters,
    selection_quality,
    size_error,
    stability_by_clusters,
)


def test_relabelled_labels_score_perfectly():
    y = np.array([0, 0, 1, 1, 2, 2, 2])
    permuted = np.array([2, 0, 1])[y]
    assert cluster_scores(y, permuted) == pytest.approx({"acc": 1.0, "nmi": 1.0, "ari": 1.0})


def test_hungarian_accuracy_on_a_known_confusion():
    # cluster 0 = mostly class 1, cluster 1 = mostly class 0; one sample off each.
    y_true = np.array([0, 0, 0, 1, 1, 1])
    y_pred = np.array([1, 1, 0, 0, 0, 1])
    assert cluster_scores(y_true, y_pred)["acc"] == pytest.approx(4 / 6)


def test_more_clusters_than_classes_matches_one_cluster_per_class():
    y_true = np.array([0, 0, 1, 1])
    y_pred = np.array([0, 1, 2, 2])
    assert cluster_scores(y_true, y_pred)["acc"] == pytest.approx(3 / 4)


def test_nmi_and_ari_on_a_known_split():
    y_true, y_pred = [0, 0, 0, 0], [0, 0, 1, 1]
    assert normalized_mutual_info(y_true, y_pred) == 0.0  # one class: no information to share
    y_true, y_pred = [0, 0, 1, 1], [0, 0, 0, 1]
    # MI = 1.5 ln 2 - 0.75 ln 3 = 0.2158; H(true) = ln 2, H(pred) = 0.5623: NMI 0.3437
    assert normalized_mutual_info(y_true, y_pred) == pytest.approx(0.34372, abs=1e-5)
    # the 6 pairs: together in both 1, apart in both 2, class only 1, cluster only 2: ARI
    # 2 (1 * 2 - 1 * 2) / (...) = 0
    assert adjusted_rand_index(y_true, y_pred) == pytest.approx(0.0)


@pytest.mark.parametrize("y_true, y_pred, nmi, ari", [
    ([0, 0, 0], [5, 5, 5], 1.0, 1.0),  # both unsplit: the same partition
    ([0, 1, 2], [0, 0, 0], 0.0, 0.0),
    ([0, 1], [1, 0], 1.0, 1.0),
    ([3], [7], 1.0, 1.0),
    ([], [], 1.0, 1.0),  # no samples: scikit-learn's answer
    ([-1, 0, 1, 1], [0, 0, 1, 1], 0.8, 4 / 7),  # any label values, negative ones too
])
def test_nmi_and_ari_limit_cases(y_true, y_pred, nmi, ari):
    scores = normalized_mutual_info(y_true, y_pred), adjusted_rand_index(y_true, y_pred)
    assert scores == pytest.approx((nmi, ari), abs=1e-12)


def test_nmi_and_ari_are_scikit_learns():
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    rng = np.random.default_rng(0)
    for trial in range(200):
        count, classes, clusters = rng.integers(1, 300), rng.integers(1, 12), rng.integers(1, 30)
        y_true = rng.integers(0, classes, count)
        y_pred = rng.integers(0, clusters, count) if trial % 2 else (y_true * 3 + rng.integers(0, 2, count))
        assert normalized_mutual_info(y_true, y_pred) == pytest.approx(
            normalized_mutual_info_score(y_true, y_pred), abs=1e-12)
        assert adjusted_rand_index(y_true, y_pred) == pytest.approx(
            adjusted_rand_score(y_true, y_pred), abs=1e-12)


def test_label_free_scores_of_balanced_and_collapsed_outputs():
    balanced = np.eye(4)[np.arange(8) % 4]
    assert label_free_scores(balanced.argmax(1), balanced.max(1), 4) == pytest.approx(
        {"balance": 1.0, "largest_cluster": 0.25, "clusters_used": 4, "confidence": 1.0})
    collapsed = np.tile([0.7, 0.1, 0.1, 0.1], (8, 1))
    scores = label_free_scores(collapsed.argmax(1), collapsed.max(1), 4)
    assert scores == pytest.approx({"balance": 0.0, "largest_cluster": 1.0, "clusters_used": 1,
                                    "confidence": 0.7})


def test_matched_confusion_puts_the_agreement_on_the_diagonal():
    from distcluster.core.metrics import matched_confusion

    y_true = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    y_pred = np.array([2, 2, 1, 0, 0, 1, 1, 3])  # cluster 2 -> class 0, 0 -> 1, 1 -> 2, 3 unmatched
    matrix, cluster_ids = matched_confusion(y_true, y_pred, clusters=5)
    assert matrix.tolist() == [[2, 0, 1, 0, 0], [0, 2, 0, 0, 0], [0, 0, 2, 1, 0]]
    assert cluster_ids == [2, 0, 1, 3, 4]  # each column keeps the model's own cluster id
    assert np.trace(matrix) / len(y_true) == cluster_scores(y_true, y_pred)["acc"]


def test_most_confident_members_best_first():
    from distcluster.tracking.plots import most_confident

    clusters = np.array([0, 1, 0, 0, 1])
    confidence = np.array([0.5, 0.9, 0.8, 0.7, 0.6])
    assert [m.tolist() for m in most_confident(clusters, confidence, np.arange(3), 2)] == [[2, 3], [1, 4], []]


def test_a_mosaic_puts_each_image_in_its_cell_and_leaves_gaps_and_empty_cells_white():
    from distcluster.tracking.plots import mosaic

    tile = [np.full((2, 3, 1), value, np.uint8) for value in (10, 20, 30)]
    grid = mosaic([[tile[0], tile[1]], [], [tile[2]]], columns=2)  # the middle cluster is empty
    assert grid.shape == (3 * 3, 2 * 4, 1)  # cells of 2x3 pixels, one white pixel after each
    assert (grid[0:2, 0:3] == 10).all() and (grid[0:2, 4:7] == 20).all() and (grid[6:8, 0:3] == 30).all()
    written = np.zeros(grid.shape, bool)
    written[0:2, 0:3] = written[0:2, 4:7] = written[6:8, 0:3] = True
    assert (grid[~written] == 255).all()


def test_view_mi_is_one_for_stable_balanced_clusters_and_zero_for_collapse():
    from distcluster.core.metrics import view_mi

    clusters = np.arange(400) % 4
    assert view_mi(clusters, clusters, 4) == pytest.approx(1.0)
    assert view_mi(clusters, (clusters + 1) % 4, 4) == pytest.approx(1.0)  # a relabelling is stable
    assert view_mi(np.zeros(400, int), np.zeros(400, int), 4) == pytest.approx(0.0)
    # Two equal clusters of four used, perfectly stable: log 2 / log 4.
    assert view_mi(clusters % 2, clusters % 2, 4) == pytest.approx(0.5)


def test_view_mi_of_assignments_that_ignore_the_image_is_near_zero():
    from distcluster.core.metrics import view_mi

    rng = np.random.default_rng(0)
    assert view_mi(rng.integers(0, 10, 20000), rng.integers(0, 10, 20000), 10) < 0.005
    # Half the probes keep their cluster, half are drawn at random: in between.
    clusters = rng.integers(0, 10, 20000)
    perturbed = np.where(rng.random(20000) < 0.5, clusters, rng.integers(0, 10, 20000))
    assert 0.2 < view_mi(clusters, perturbed, 10) < 0.5


def test_consensus_rewards_the_partition_the_stable_others_agree_with():
    from distcluster.core.metrics import consensus

    rng = np.random.default_rng(0)
    truth = np.arange(600) % 6
    relabelled = (truth + 2) % 6
    merged = truth // 2  # three clusters, each two of the six groups
    noise = rng.integers(0, 6, 600)
    scores = consensus([truth, relabelled, merged, noise], [1.0, 1.0, 1.0, 1.0])
    assert scores[0] == pytest.approx(scores[1])  # a relabelling is the same partition
    assert scores[0] > scores[2] > scores[3]
    assert scores[3] < 0.05
    # A weight of 0 takes a partition out of the others' consensus.
    assert consensus([truth, relabelled, noise], [1.0, 1.0, 0.0])[:2] == pytest.approx([1.0, 1.0])
    assert consensus([truth], [0.7]) == [1.0]


def test_pictures_of_a_thousand_clusters_show_the_largest_and_stay_readable(tmp_path):
    """K = 1000: the gallery, the sizes and the confusion matrix keep a bounded size."""
    from PIL import Image

    from distcluster.core.metrics import matched_confusion
    from distcluster.tracking import plots

    k, rng = 1000, np.random.default_rng(0)
    clusters = rng.integers(0, k, 20_000)
    clusters[:500] = 7  # the largest cluster, then 3
    clusters[500:800] = 3
    assert plots.shown_clusters(clusters, k)[:2].tolist() == [7, 3]
    assert len(plots.shown_clusters(clusters, k)) == plots.MAX_SHOWN_CLUSTERS
    assert plots.shown_clusters(clusters[:50] % 5, 5).tolist() == [0, 1, 2, 3, 4]
    images = rng.integers(0, 255, (len(clusters), 8, 8, 1), dtype=np.uint8)
    plots.gallery(images, clusters, rng.random(len(clusters)), k, tmp_path / "gallery.png")
    plots.cluster_sizes(clusters, k, tmp_path / "sizes.png")
    labels = clusters % 10
    matrix, ids = matched_confusion(labels, clusters, k)
    plots.confusion(matrix, [str(c) for c in range(10)], ids, tmp_path / "confusion.png")
    for name in ("gallery", "sizes", "confusion"):
        width, height = Image.open(tmp_path / f"{name}.png").size
        assert width <= 4000 and height <= 4000, (name, width, height)


def test_stability_is_one_for_relabelled_runs_near_zero_for_unrelated_ones_and_needs_two_runs():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(4), 250)  # four true groups of 250 images
    relabelled = [groups, (groups + 1) % 4, (groups * 3) % 4]  # the same partition, other names
    split_differently = [np.where(groups == 0, 4 + rng.integers(0, 2, 1000), groups) for _ in range(3)]
    stability = stability_by_clusters({4: relabelled, 5: split_differently, 6: [groups]})
    assert stability[4] == pytest.approx(1.0) and set(stability) == {4, 5}
    assert 0.5 < stability[5] < 0.95  # three groups agree, the fourth is split at random
    unrelated = [rng.integers(0, 8, 1000) for _ in range(3)]
    assert abs(stability_by_clusters({8: unrelated})[8]) < 0.02  # chance-adjusted: no bias to K
    assert recommended_clusters(stability) == 4


def test_equally_noisy_runs_of_the_true_k_beat_runs_that_merge_groups_where_ari_would_not():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(6), 200)

    def noisy(labels: np.ndarray, k: int) -> np.ndarray:  # 30% of the images in a random cluster
        moved = rng.random(len(labels)) < 0.3
        return np.where(moved, rng.integers(0, k, len(labels)), labels)

    runs = {2: [noisy(groups // 3, 2) for _ in range(3)], 6: [noisy(groups, 6) for _ in range(3)]}
    assert recommended_clusters(stability_by_clusters(runs)) == 6
    by_ari = {k: np.mean([adjusted_rand_index(a, b) for a, b in itertools.combinations(r, 2)])
              for k, r in runs.items()}
    assert max(by_ari, key=by_ari.get) == 2  # why the criterion is AMI, not ARI


def test_the_recommendation_is_the_most_stable_k_and_the_smaller_on_a_tie():
    assert recommended_clusters({6: 0.5, 8: 0.9, 10: 0.7}) == 8
    assert recommended_clusters({12: 0.8, 10: 0.8, 11: 0.3}) == 10


def test_the_plot_of_stability_against_k_is_written(tmp_path):
    from PIL import Image

    from distcluster.tracking import plots

    plots.stability({"8": 0.61, "9": 0.7, "10": 0.93, "11": 0.8}, 10, tmp_path / "k.png")
    assert Image.open(tmp_path / "k.png").size[0] > 200


def test_matched_sizes_show_a_split_class_and_a_merge_beside_the_class_sizes(tmp_path):
    """Class 0 (600 images) split over clusters 0 and 3; 60 of class 2 merged into class 1's
    cluster 1, its other 40 with class 0's second part; class 3 alone in cluster 2; cluster 4
    empty."""
    labels = np.repeat([0, 0, 1, 2, 2, 3], [350, 250, 100, 60, 40, 100])
    clusters = np.repeat([0, 3, 1, 1, 3, 2], [350, 250, 100, 60, 40, 100])
    sizes = matched_sizes(labels, clusters, 5)
    assert sizes["classes"].tolist() == [0, 1, 2, 3] and sizes["class_sizes"].tolist() == [600, 100, 100, 100]
    assert sizes["matched_sizes"].tolist() == [350, 160, 290, 100]  # clusters 0, 1, 3, 2
    assert sizes["unmatched_sizes"].tolist() == [0]  # cluster 4
    from distcluster.tracking import plots

    plots.sizes_against_classes(sizes, ["big", "b", "c", "d"], tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 0


def test_size_error_is_zero_for_the_same_sizes_in_any_order_and_grows_with_a_split():
    labels = np.repeat([0, 1, 2], [60, 30, 10])
    assert size_error(labels, np.repeat([2, 0, 1], [60, 30, 10])) == 0.0  # names do not matter
    assert size_error(labels, np.repeat([0, 1, 2], [34, 33, 33])) == pytest.approx(0.26)  # forced equal
    assert size_error(np.repeat([0, 1], [50, 50]), np.zeros(100, int)) == pytest.approx(0.5)  # 1 - 1/K


def test_selection_quality_of_a_score_that_ranks_trials_as_acc_does_and_one_that_does_not():
    label_free, acc = [0.1, 0.5, 0.9, 0.3], [0.2, 0.4, 0.6, 0.3]
    assert selection_quality(label_free, acc, picked=2) == pytest.approx(
        {"spearman": 1.0, "picked_acc": 0.6, "best_acc": 0.6, "gap": 0.0})
    reversed_score = [-v for v in label_free]
    assert selection_quality(reversed_score, acc, picked=0) == pytest.approx(
        {"spearman": -1.0, "picked_acc": 0.2, "best_acc": 0.6, "gap": 0.4})
    assert selection_quality([0.1, 0.2], [0.3, 0.4], picked=1)["spearman"] is None  # too few to rank


def test_the_plot_of_the_label_free_score_against_acc_is_written(tmp_path):
    from PIL import Image

    from distcluster.tracking import plots

    points = {"a": (0.4, 0.30), "b": (0.7, 0.41), "c": (0.9, 0.45)}
    plots.label_free_vs_acc(points, "c", "held_out_acc", 1.0, tmp_path / "s.png")
    plots.label_free_vs_acc(points, "a", "acc", None, tmp_path / "none.png")  # too few to rank
    assert Image.open(tmp_path / "s.png").size[0] > 200 and (tmp_path / "none.png").stat().st_size > 0


def test_departure_from_equal_sizes_has_known_answers():
    assert departure_from_equal([0.25] * 4) == 0
    assert departure_from_equal([1.0, 0.0, 0.0, 0.0]) == pytest.approx(0.75)
    assert departure_from_equal([0.5, 0.3, 0.2]) == pytest.approx(0.5 * (1 / 6 + 1 / 30 + 2 / 15))

"""Can a trained model's features see how big the groups are? (what `prior: estimated` needs)

    .venv/bin/python benchmarks/size_profiles.py --model OUT/model --data LABELLED \\
        --per-class 900 [--imbalance 10] [--name NAME]

Draws two subsets of the labelled images with benchmarks/subsets.py's rule, a balanced one
(--per-class of every class) and a long-tailed one (--per-class down to --per-class /
--imbalance), and for each reports the cluster sizes, largest first, that label-free estimators
find on the model's backbone features: spherical k-means with K clusters (what `prior:
estimated` pulls towards, core/objectives/prior.py), k-means with 10 K clusters merged to K by
Ward linkage of their centres, and the argmax of the model's chosen sub-head. Each with its
departure from equal sizes (half the L1 distance of the sorted shares to 1/K: 0 for equal
groups) and its AMI with the classes. An estimator that sees the sizes departs far more on the
long-tailed subset than on the balanced one. Prints a table and updates the
`size-profiles-NAME` section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import AgglomerativeClustering
from sklearn.metrics import adjusted_mutual_info_score

sys.path.insert(0, str(Path(__file__).parent))
from common import provenance, write_section  # noqa: E402
from heads_or_features import features_and_logits, model_and_labelled_images  # noqa: E402
from subsets import class_sizes, subset  # noqa: E402

from distcluster.commands.cli import run_command  # noqa: E402
from distcluster.common.errors import UserError  # noqa: E402
from distcluster.core.metrics import departure_from_equal  # noqa: E402
from distcluster.core.objectives.prior import spherical_kmeans  # noqa: E402
from distcluster.data.sources import open_source, resolve_data  # noqa: E402

OVER_CLUSTERING = 10  # fine k-means clusters per group before the Ward merge


def shares(groups: np.ndarray, clusters: int) -> np.ndarray:
    """The share of the images in each group, largest first."""
    return np.sort(np.bincount(groups, minlength=clusters))[::-1] / len(groups)


def merged_kmeans(features: torch.Tensor, clusters: int, generator: torch.Generator) -> np.ndarray:
    """k-means with OVER_CLUSTERING x clusters groups, their centres merged to `clusters` by Ward."""
    fine = spherical_kmeans(features, OVER_CLUSTERING * clusters, generator, restarts=1).numpy()
    used = np.unique(fine)
    if len(used) <= clusters:  # nothing to merge: k-means left no more groups occupied than wanted
        return np.searchsorted(used, fine)
    unit = F.normalize(features.double(), dim=-1).numpy()
    centres = np.stack([unit[fine == c].mean(0) for c in used])
    merged = AgglomerativeClustering(n_clusters=clusters, linkage="ward").fit_predict(centres)
    return merged[np.searchsorted(used, fine)]


def estimates(loaded, images: np.ndarray, labels: np.ndarray, folder: Path) -> dict[str, np.ndarray]:
    """Each estimator's groups of the images (and the classes themselves)."""
    path = folder / "subset.npz"
    np.savez(path, x=images, y=labels)
    features, logits = features_and_logits(loaded.model, loaded, open_source(resolve_data(str(path))))
    clusters, seeded = loaded.clusters, torch.Generator().manual_seed
    return {"classes": labels,
            "k-means (the estimated prior's)": spherical_kmeans(features, clusters, seeded(0)).numpy(),
            f"k-means x{OVER_CLUSTERING}, Ward-merged": merged_kmeans(features, clusters, seeded(0)),
            "the model's sub-head (argmax)": logits[loaded.head].argmax(1).numpy()}


def row(drawn: str, estimator: str, groups: np.ndarray, labels: np.ndarray, clusters: int) -> str:
    ami = "" if estimator == "classes" else f"{adjusted_mutual_info_score(labels, groups):.3f}"
    found = shares(groups, clusters)
    largest_first = " ".join(f"{s:.3f}" for s in found)
    return f"| {drawn} | {estimator} | **{departure_from_equal(found):.3f}** | {ami} | {largest_first} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model folder (OUT/model) or checkpoint folder")
    parser.add_argument("--data", required=True, help="labelled images SPEC")
    parser.add_argument("--per-class", type=int, required=True,
                        help="images of every class (balanced) or of the largest (long-tailed)")
    parser.add_argument("--imbalance", type=float, default=10.0)
    parser.add_argument("--name", default="model", help="section name in RESULTS.md")
    parser.add_argument("--about", default="", help="what the model is and what it trained on, "
                        "for RESULTS.md (the section is rewritten whole on every run)")
    args = parser.parse_args()
    if args.per_class < 1 or args.imbalance < 1:
        raise UserError("--per-class must be >= 1 and --imbalance >= 1")
    torch.set_flush_denormal(True)
    loaded, source = model_and_labelled_images(args.model, args.data)
    classes = sorted(set(source.labels.tolist()) - {-1})
    if len(classes) != loaded.clusters:
        raise UserError(f"{args.data} has {len(classes)} classes, the model {loaded.clusters} clusters")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, imbalance in (("balanced", 1.0), ("long-tailed", args.imbalance)):
            sizes = class_sizes(len(classes), args.per_class, imbalance)
            images, labels = subset(source, classes, sizes, seed=0)
            for estimator, groups in estimates(loaded, images, labels, Path(folder)).items():
                rows.append(row(name, estimator, groups, labels, loaded.clusters))
    header = "| subset | sizes from | departure from equal | AMI with the classes | shares, largest first |"
    table = "\n".join([header, "|---|---|---|---|---|", *rows])
    print(table)
    command = (f".venv/bin/python benchmarks/size_profiles.py --model {args.model} --data {args.data} "
               f"--per-class {args.per_class} --imbalance {args.imbalance:g} --name {args.name}")
    write_section(f"size-profiles-{args.name}",
                  f"## Group sizes seen by label-free estimators: {args.name} (issue 32)\n\n"
                  f"{provenance(args.about)}\nCommand: `{command}`\n\n{table}")


if __name__ == "__main__":
    sys.exit(run_command("size_profiles.py", main))

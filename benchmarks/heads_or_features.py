"""What limits a trained model's held-out ACC: its cluster sub-heads or its backbone features?

    .venv/bin/python benchmarks/heads_or_features.py --model OUT/model --data held-out.npz [--name NAME]

For each sub-head of the model: ACC, NMI and the sizes of its argmax clusters against its
soft marginal (mean probability) on the labelled images, and the ACC after a logit shift
that gives every cluster the share its soft marginal gives it (core.objectives.prior.
fitted_shift, fitted on these same unlabelled probabilities). Then spherical k-means (K
clusters, 4 restarts) on the backbone's features of the same images: when k-means scores
above every head, the heads do not use all the features hold. Prints a table and updates the
`heads-or-features-NAME` section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import provenance, write_section  # noqa: E402

from distcluster.commands.cli import run_command  # noqa: E402
from distcluster.common.errors import UserError  # noqa: E402
from distcluster.core.metrics import cluster_scores  # noqa: E402
from distcluster.core.objectives.prior import fitted_shift, spherical_kmeans  # noqa: E402
from distcluster.data.sources import open_source, resolve_data  # noqa: E402
from distcluster.engine.exported import fit_input, load_model  # noqa: E402


@torch.no_grad()
def features_and_logits(model, loaded, source) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features (n, D) and every sub-head's log-probabilities (S, n, K) of all images."""
    features, logits = [], []
    for images in source.batches(1000):
        f = model.backbone(fit_input(images, loaded)).float()
        features.append(f)
        logits.append(model.objective.cluster_probs(f).clamp_min(1e-30).log())  # as assigned
    return torch.cat(features), torch.cat(logits, 1)


def model_and_labelled_images(model: str, data: str):
    """The trained model and the labelled images a benchmark scores it on (UserError without labels)."""
    loaded = load_model(Path(model))
    source = open_source(resolve_data(data))
    if source.labels is None:
        raise UserError(f"{data}: needs labels")
    return loaded, source


def head_rows(logits: torch.Tensor, labels, chosen: int) -> list[str]:
    rows = []
    for s, head in enumerate(logits):
        scores = cluster_scores(labels, head.argmax(1).numpy())
        sizes = torch.bincount(head.argmax(1), minlength=head.shape[1]).sort(descending=True).values
        soft = (head.softmax(-1).sum(0).sort(descending=True).values).round().int()
        shifted = head + fitted_shift(head.unsqueeze(0).double())[0].float()
        acc_shifted = cluster_scores(labels, shifted.argmax(1).numpy())["acc"]
        mark = " (the model's)" if s == chosen else ""
        rows.append(f"| sub-head {s}{mark} | {scores['acc']:.4f} | {scores['nmi']:.4f} | {acc_shifted:.4f} | "
                    f"{' '.join(map(str, sizes.tolist()))} | {' '.join(map(str, soft.tolist()))} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model folder (OUT/model) or checkpoint folder")
    parser.add_argument("--data", required=True, help="labelled images SPEC the model never trained on")
    parser.add_argument("--name", default="model", help="section name in RESULTS.md")
    parser.add_argument("--about", default="", help="what the model is and what it trained on, "
                        "for RESULTS.md (the section is rewritten whole on every run)")
    args = parser.parse_args()
    torch.set_flush_denormal(True)
    loaded, source = model_and_labelled_images(args.model, args.data)
    labels = source.labels.numpy()
    features, logits = features_and_logits(loaded.model, loaded, source)
    found = spherical_kmeans(features, loaded.clusters, torch.Generator().manual_seed(0))
    kmeans = cluster_scores(labels, found.numpy())
    kmeans_sizes = torch.bincount(found, minlength=loaded.clusters).sort(descending=True).values
    kmeans_sizes = " ".join(map(str, kmeans_sizes.tolist()))
    table = "\n".join([
        "| clusters from | ACC | NMI | ACC, argmax shifted to the soft shares | argmax sizes | soft sizes |",
        "|---|---|---|---|---|---|", *head_rows(logits, labels, loaded.head),
        f"| k-means on the features | {kmeans['acc']:.4f} | {kmeans['nmi']:.4f} | | {kmeans_sizes} | |"])
    print(table)
    write_section(f"heads-or-features-{args.name}",
                  f"## Sub-heads or features: {args.name}\n\n{provenance(args.about)}\nCommand: "
                  f"`.venv/bin/python benchmarks/heads_or_features.py --model {args.model} "
                  f"--data {args.data} --name {args.name}` ({len(labels):,} images).\n\n{table}")


if __name__ == "__main__":
    sys.exit(run_command("heads_or_features.py", main))

"""Other ways to choose K, computed on the trials of a finished choose-K sweep.

    .venv/bin/python benchmarks/choose_k_criteria.py SWEEP_FOLDER [--name NAME]

SWEEP_FOLDER is a `tune --space ...-choose-k` output folder (tune_summary.json and every
trial's clusters of the consensus images). For every K, over its seeds' pairs: stability as the
sweep computes it (mean AMI, core.metrics.stability_by_clusters), the mean mutual information
between two seeds' clusterings (nats: how much of the grouping the seeds reproduce) and that
over the mean entropy of the clusterings, and PAC (the share of image pairs that the seeds
put together sometimes but not almost always, co-assignment in (0.1, 0.9): lower is better;
Senbabaoglu et al. 2014). Each criterion's pick is marked. No training: seconds. Prints a
table and updates the `choose-k-criteria-NAME` section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_section  # noqa: E402

from distcluster.core.metrics import contingency, mutual_information, stability_by_clusters  # noqa: E402

PAC_BAND = (0.1, 0.9)
PAC_PAIRS_OF = 1500  # images whose pairs PAC looks at (a fixed random sample)


def partitions_by_k(folder: Path) -> dict[int, list[np.ndarray]]:
    summary = json.loads((folder / "tune_summary.json").read_text())
    found: dict[int, list[np.ndarray]] = {}
    for trial in summary["trials"]:
        if trial["status"] == "completed":
            clusters = np.load(folder / "trials" / trial["trial_id"] / "consensus" / "clusters.npy")
            found.setdefault(int(trial["config"]["clusters"]), []).append(clusters)
    return found


def entropy_of(clusters: np.ndarray) -> float:
    shares = np.bincount(clusters) / len(clusters)
    shares = shares[shares > 0]
    return float(-(shares * np.log(shares)).sum())


def pac(partitions: list[np.ndarray]) -> float:
    picked = np.random.default_rng(0).choice(len(partitions[0]), min(len(partitions[0]), PAC_PAIRS_OF),
                                             replace=False)
    together = np.mean([p[picked][:, None] == p[picked][None] for p in partitions], axis=0)
    pairs = together[np.triu_indices(len(picked), 1)]
    return float(((pairs > PAC_BAND[0]) & (pairs < PAC_BAND[1])).mean())


def criteria(found: dict[int, list[np.ndarray]]) -> dict[int, dict[str, float]]:
    stability = stability_by_clusters(found)
    rows = {}
    for k in sorted(stability):
        pairs = list(itertools.combinations(found[k], 2))
        shared = np.mean([mutual_information(contingency(a, b) / len(a)) for a, b in pairs])
        spread = np.mean([entropy_of(p) for p in found[k]])
        rows[k] = {"stability": stability[k], "mi": shared, "mi_share": shared / spread, "pac": pac(found[k])}
    return rows


PICK = {"stability": max, "mi": max, "mi_share": max, "pac": min}


def table(rows: dict[int, dict[str, float]]) -> list[str]:
    picks = {name: choose(rows, key=lambda k, n=name: rows[k][n]) for name, choose in PICK.items()}
    labels = {"stability": "stability (mean AMI, the sweep's)", "mi": "mutual information (nats)",
              "mi_share": "mutual information / entropy", "pac": "PAC (lower is better)"}
    lines = ["| criterion | " + " | ".join(f"K={k}" for k in rows) + " | picks |",
             "|---|" + "---|" * (len(rows) + 1)]
    for name, label in labels.items():
        cells = [f"**{rows[k][name]:.3f}**" if k == picks[name] else f"{rows[k][name]:.3f}" for k in rows]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {picks[name]} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--name", help="the RESULTS.md section's suffix (default: the folder's name)")
    args = parser.parse_args()
    found = partitions_by_k(args.folder)
    name = args.name or args.folder.name
    body = "\n".join([f"## Criteria for K on the trials of one sweep: {name} (issue 32)", "",
                      f"    .venv/bin/python benchmarks/choose_k_criteria.py SWEEP_FOLDER --name {name}", "",
                      f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}. The sweep's trials, seeds "
                      f"per K: {', '.join(f'{k}: {len(v)}' for k, v in sorted(found.items()))}.", "",
                      *table(criteria(found))])
    print(body)
    write_section(f"choose-k-criteria-{name}", body)


if __name__ == "__main__":
    main()

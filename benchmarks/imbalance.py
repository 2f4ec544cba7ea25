"""The cluster-size priors (uniform, estimated, calibrated) on balanced and long-tailed data.

    .venv/bin/python benchmarks/imbalance.py [--data digits] [--recipe digits-imc-swav]
        [--per-class 170] [--imbalance 10] [--seeds 0 1 2] [--priors uniform estimated calibrated]
        [--sets balanced long-tailed] [--set KEY=VALUE ...]

Makes two sets from the labelled data SPEC with benchmarks/subsets.py's rule (or those named
by --sets): the balanced one (every class at --per-class images, or all the class has) and a
long-tailed one (sizes decaying exponentially from --per-class to --per-class / --imbalance,
classes in their label order). Trains the recipe in-process (`--workers 0`) on each with
every `prior` asked for (all by default), every seed, and reports the median ACC, NMI and
size error (core.metrics: half the L1 distance between the sorted cluster and class size
fractions). Prints a table and updates the `imbalance-<data>` section of RESULTS.md
(`imbalance-<data>-<sets>-<per class>` with --sets, `...-KEY=VALUE...` with --set).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_section  # noqa: E402
from subsets import class_sizes, subset  # noqa: E402

from distcluster.core.metrics import cluster_scores, size_error  # noqa: E402
from distcluster.core.objectives.prior import PRIORS  # noqa: E402
from distcluster.data.sources import open_source, resolve_data  # noqa: E402

SETS = ("balanced", "long-tailed")


def write_sets(spec: str, per_class: int, imbalance: float, folder: Path,
               names: tuple[str, ...] = SETS) -> dict[str, Path]:
    source = open_source(resolve_data(spec))
    labels = source.labels.numpy()
    classes = sorted(set(labels.tolist()))
    available = [int((labels == c).sum()) for c in classes]
    sets = {"balanced": [min(per_class, n) for n in available],
            "long-tailed": class_sizes(len(classes), per_class, imbalance)}
    paths = {}
    for name, sizes in sets.items():
        if name not in names:
            continue
        images, classes_of = subset(source, classes, sizes, seed=0)
        paths[name] = folder / f"{name}.npz"
        np.savez(paths[name], x=images, y=classes_of)
    return paths


def train(data: Path, recipe: str, prior: str, seed: int, folder: Path, overrides: list[str]) -> dict:
    out = folder / f"{data.stem}-{prior}-{seed}"
    subprocess.run([sys.executable, "-m", "distcluster.train", "--config", recipe, "--data", str(data),
                    "--workers", "0", "--seed", str(seed), "--set", f"prior={prior}", "--output", str(out),
                    "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}",
                    *[arg for o in overrides for arg in ("--set", o)]],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = torch.load(out / "checkpoint" / "checkpoint.pt", weights_only=True)
    clusters = state["assignments"]["clusters"].numpy()
    labels = np.load(data)["y"]
    return {**cluster_scores(labels, clusters), "size_error": size_error(labels, clusters),
            "sizes": largest_first(clusters), "class_sizes": largest_first(labels)}


def largest_first(groups: np.ndarray) -> str:
    return " ".join(str(n) for n in sorted(np.bincount(groups).tolist(), reverse=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="digits")
    parser.add_argument("--recipe", default="digits-imc-swav")
    parser.add_argument("--per-class", type=int, default=170)
    parser.add_argument("--imbalance", type=float, default=10.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--priors", nargs="+", default=list(PRIORS), choices=PRIORS)
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sets = write_sets(args.data, args.per_class, args.imbalance, folder, tuple(args.sets))
        for name, data in sets.items():
            for prior in args.priors:
                runs = [train(data, args.recipe, prior, seed, folder, args.overrides) for seed in args.seeds]
                median = {k: statistics.median(r[k] for r in runs) for k in ("acc", "nmi", "size_error")}
                rows.append((name, prior, median, runs))
                print(name, prior, {k: round(v, 4) for k, v in median.items()},
                      [round(r["acc"], 3) for r in runs], flush=True)
    table = ["| set | prior | ACC | NMI | size error | ACC of each seed | sizes, seed "
             f"{args.seeds[0]} |", "|---|---|---|---|---|---|---|"]
    for i, (name, prior, median, runs) in enumerate(rows):
        if i == 0 or rows[i - 1][0] != name:
            table.append(f"| {name} | (classes) | | | | | {runs[0]['class_sizes']} |")
        table.append(f"| {name} | {prior} | {median['acc']:.3f} | {median['nmi']:.3f} | "
                     f"{median['size_error']:.3f} | " + ", ".join(f"{r['acc']:.3f}" for r in runs)
                     + f" | {runs[0]['sizes']} |")
    command = (f".venv/bin/python benchmarks/imbalance.py --data {args.data} --recipe {args.recipe} "
               f"--per-class {args.per_class} --imbalance {args.imbalance:g} --seeds "
               + " ".join(map(str, args.seeds)) + " --priors " + " ".join(args.priors)
               + ("" if tuple(args.sets) == SETS else " --sets " + " ".join(args.sets))
               + "".join(f" --set {o}" for o in args.overrides))
    title = f"## Cluster-size priors on {' and '.join(args.sets)} {Path(args.data).stem} (issue 32)"
    body = "\n".join([title, "",
                      f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}. Medians of "
                      f"{len(args.seeds)} seeds, recipe {args.recipe}, in-process.", "",
                      f"    {command}", "", *table, "",
                      "Size error: half the L1 distance between the sorted cluster-size and class-size "
                      "fractions (0: the same sizes). Sizes: images per cluster (or class), largest first."])
    print(body)
    # runs with --set overrides get a section of their own beside the plain one
    sets = [] if tuple(args.sets) == SETS else [*args.sets, str(args.per_class)]
    write_section("-".join([f"imbalance-{Path(args.data).stem}", *sets, *args.overrides]), body)


if __name__ == "__main__":
    main()

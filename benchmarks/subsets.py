"""Reproducible subsets of a labelled data SPEC, balanced or long-tailed, as one .npz.

    .venv/bin/python benchmarks/subsets.py ../shared/data/cifar10-train-jpg.zip --classes 0 1 2 3 4 \\
        --per-class 1000 --out /tmp/cifar5.npz                       # 5 classes x 1,000 images
    .venv/bin/python benchmarks/subsets.py digits --per-class 170 --imbalance 10 --out /tmp/digits-lt.npz

Takes the classes given (default: all), and from class number c (counted from 0 in the order
given) n_c = round(per_class x imbalance^(-c / (C - 1))) images drawn at random with --seed:
sizes decaying exponentially from --per-class down to --per-class / --imbalance (imbalance 1:
balanced). Labels are renumbered 0..C-1 in that order. Writes `x` (N, H, W, C) uint8 and `y`,
which any command takes as `--data FILE.npz`, and prints the class sizes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from distcluster.commands.cli import run_command
from distcluster.common.errors import UserError
from distcluster.common.files import atomic_file
from distcluster.data.sources import open_source, resolve_data


def class_sizes(classes: int, per_class: int, imbalance: float) -> list[int]:
    """per_class x imbalance^(-c / (classes - 1)) for c = 0..classes-1, rounded."""
    if classes == 1:
        return [per_class]
    return [round(per_class * imbalance ** (-c / (classes - 1))) for c in range(classes)]


def draw(labels: np.ndarray, classes: list[int], sizes: list[int], seed: int) -> np.ndarray:
    """Indices of `sizes[i]` images of class `classes[i]`, drawn at random, in index order."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label, size in zip(classes, sizes, strict=True):
        members = np.flatnonzero(labels == label)
        if size > len(members):
            raise UserError(f"class {label} has {len(members)} images, {size} asked for")
        chosen.append(rng.choice(members, size, replace=False))
    return np.sort(np.concatenate(chosen))


def subset(source, classes: list[int], sizes: list[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """x (N, H, W, C) uint8 and y renumbered 0..C-1 in the order of `classes`: only the drawn
    images are read."""
    labels = source.labels.numpy()
    kept = draw(labels, classes, sizes, seed)
    renumbered = {label: i for i, label in enumerate(classes)}
    return source.take(kept).permute(0, 2, 3, 1).numpy(), np.array([renumbered[y] for y in labels[kept]])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data")
    parser.add_argument("--classes", type=int, nargs="+", help="labels to keep, in size order (default: all)")
    parser.add_argument("--per-class", type=int, required=True, help="images of the first (largest) class")
    parser.add_argument("--imbalance", type=float, default=1.0, help="largest class size / smallest")
    parser.add_argument("--out", required=True, help="FILE.npz")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.per_class < 1 or args.imbalance < 1:
        raise UserError("--per-class must be >= 1 and --imbalance >= 1")
    source = open_source(resolve_data(args.data))
    if source.labels is None:
        raise UserError(f"{args.data} has no labels: no classes to draw from")
    labels = source.labels.numpy()
    classes = args.classes if args.classes is not None else sorted(set(labels.tolist()) - {-1})
    sizes = class_sizes(len(classes), args.per_class, args.imbalance)
    images, classes_of = subset(source, classes, sizes, args.seed)
    with atomic_file(Path(args.out)) as staging, open(staging, "wb") as handle:
        np.savez(handle, x=images, y=classes_of)
    named = dict(zip(map(str, classes), sizes, strict=True))
    print(json.dumps({"images": len(images), "class_sizes": named}))


if __name__ == "__main__":
    sys.exit(run_command("subsets", lambda: main()))

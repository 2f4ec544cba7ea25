"""Split a labelled data SPEC into a training part and a held-out part, as two .npz files.

    .venv/bin/python benchmarks/split_data.py ../shared/data/cifar10-train-jpg.zip \\
        --held-out 10000 --out /tmp/cifar10 [--seed 0]

writes /tmp/cifar10-train.npz (the rest) and /tmp/cifar10-heldout.npz (`--held-out` images
drawn at random with `--seed`), each with `x` (N, H, W, C) uint8 and `y`. The held-out images
are never trained on by time_to_accuracy.py (`--data ...-train.npz --eval-data ...-heldout.npz`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from distcluster.commands.cli import run_command
from distcluster.common.errors import UserError
from distcluster.data.sources import open_source, resolve_data


def read_all(spec: str) -> tuple[np.ndarray, np.ndarray]:
    source = open_source(resolve_data(spec))
    if source.labels is None:
        raise UserError(f"{spec} has no labels: nothing to score a held-out part with")
    images = np.concatenate([batch.permute(0, 2, 3, 1).numpy() for batch in source.batches(1024)])
    return images, source.labels.numpy()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data")
    parser.add_argument("--held-out", type=int, default=10_000)
    parser.add_argument("--out", required=True, help="path prefix of the two .npz files")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    images, labels = read_all(args.data)
    if not 0 < args.held_out < len(images):
        raise UserError(f"--held-out must be between 1 and {len(images) - 1}, got {args.held_out}")
    order = np.random.default_rng(args.seed).permutation(len(images))
    held_out, train = np.sort(order[:args.held_out]), np.sort(order[args.held_out:])
    for name, rows in (("train", train), ("heldout", held_out)):
        path = Path(f"{args.out}-{name}.npz")
        np.savez(path, x=images[rows], y=labels[rows])
        print(f"{path}: {len(rows)} images, {len(np.unique(labels[rows]))} classes")


if __name__ == "__main__":
    sys.exit(run_command("split_data.py", main))

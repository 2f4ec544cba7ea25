"""What a short Ray run spends outside its training steps: importing distcluster in each new
process, waiting for Ray Train's controller to collect each epoch's report, drawing the gallery.

    .venv/bin/python benchmarks/run_overhead.py [--repeats 3] [--epochs 8]

1. The import of `distcluster.cluster.ray_train` that every Ray worker and controller does: a fresh
   `python -c "import distcluster.cluster.ray_train"`, median of `--repeats`.
2. The same short run, `python -m distcluster.train --workers 2 --epochs E --batch-size 128
   --set max_samples=512` (a checkpoint and a report every epoch), with the controller polling
   every 2 s (Ray's default, set through RAY_TRAIN_HEALTH_CHECK_INTERVAL_S) and every 0.25 s
   (distcluster's), interleaved, each repeated `--repeats` times: the median time in training
   (summary.json fit_seconds) and of the whole command.
3. The cluster gallery of the 1,797 digits (10 most confident images per cluster) for 10 and
   100 clusters (random assignments for 100), in this process.
Prints a table and updates the `run-overhead-cpu` section of RESULTS.md (the runs use no GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_section  # noqa: E402

POLLS = ("2", "0.25")  # seconds: Ray's default, distcluster's


def import_seconds() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import distcluster.cluster.ray_train"], check=True)
    return time.perf_counter() - started


def gallery_seconds(k: int, folder: Path) -> float:
    from distcluster.data.images import digits_arrays
    from distcluster.tracking.plots import gallery

    images, labels = digits_arrays()
    rng = np.random.default_rng(0)
    clusters = labels if k == 10 else rng.integers(0, k, len(labels))
    started = time.perf_counter()
    gallery(images, clusters, rng.random(len(labels)), k, folder / f"gallery-{k}.png")
    return time.perf_counter() - started


def short_run(poll: str, epochs: int, folder: Path) -> dict[str, float]:
    out = folder / f"poll-{poll}-{time.monotonic_ns()}"
    argv = [sys.executable, "-m", "distcluster.train", "--workers", "2", "--epochs", str(epochs),
            "--batch-size", "128", "--set", "max_samples=512", "--output", str(out), "--run-name", out.name,
            "--experiment", "benchmark-overhead", "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}"]
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, cwd=folder,
                   env={**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": poll})
    command = time.perf_counter() - started
    summary = json.loads((out / "summary.json").read_text())
    return {"command": command, "fit": summary["fit_seconds"], "acc": summary["metrics"]["acc"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    imports = statistics.median(import_seconds() for _ in range(args.repeats))
    runs: dict[str, list[dict[str, float]]] = {poll: [] for poll in POLLS}
    with tempfile.TemporaryDirectory() as tmp:
        gallery_seconds(10, Path(tmp))  # matplotlib's import and font cache: not the gallery's
        galleries = {k: statistics.median(gallery_seconds(k, Path(tmp)) for _ in range(args.repeats))
                     for k in (10, 100)}
        for _ in range(args.repeats):
            for poll in POLLS:
                runs[poll].append(short_run(poll, args.epochs, Path(tmp)))
                print(f"poll {poll} s: {runs[poll][-1]}", flush=True)
    lines = [f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}.",
             f"Command: `.venv/bin/python benchmarks/run_overhead.py --repeats {args.repeats} "
             f"--epochs {args.epochs}` (medians of the repeats).", "",
             f"Import of `distcluster.cluster.ray_train` in a new process (each Ray worker and controller): "
             f"**{imports:.2f} s**.", "",
             "Cluster gallery of the 1,797 digits: " + ", ".join(
                 f"**{seconds:.2f} s** for {k} clusters" for k, seconds in galleries.items()) + ".", "",
             f"`python -m distcluster.train --workers 2 --epochs {args.epochs} --batch-size 128 --set "
             "max_samples=512` (a report and a checkpoint every epoch):", "",
             "| controller poll | training s | training s of each repeat | command s | final ACC |",
             "|---|---|---|---|---|"]
    for poll in POLLS:
        rows = runs[poll]
        fits = ", ".join(f"{r['fit']:.1f}" for r in rows)
        lines.append(f"| {poll} s | {statistics.median(r['fit'] for r in rows):.1f} | {fits} "
                     f"| {statistics.median(r['command'] for r in rows):.1f} "
                     f"| {statistics.median(r['acc'] for r in rows):.4f} |")
    table = "\n".join(lines)
    print(table)
    write_section("run-overhead-cpu", f"## Overhead of a short Ray run on CPU workers\n\n{table}")


if __name__ == "__main__":
    main()

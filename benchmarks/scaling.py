"""Throughput at 0 (in-process), 1 and 2 Ray workers on the same work, and Ray's overhead.

    .venv/bin/python benchmarks/scaling.py [--recipe digits-imc-swav] [--data SPEC] [--epochs 12]
        [--workers 0 1 2] [--repeats 3] [--set KEY=VALUE ...]

Each run is `python -m distcluster.train --config RECIPE --workers W --epochs E
--set eval_every=0` (evaluation only after the last epoch, so that epochs time
training alone), one after the other on an otherwise idle machine, the worker
counts interleaved and the whole round repeated `--repeats` times (short CPU
epochs are noisy). From each run's checkpoint history: the median epoch time
(the first epoch, which warms up, is left out) and images/s; per worker count
the median over repeats. Ray's overhead = epoch time at 1 worker / at 0
workers - 1.
Prints a table and updates the `scaling-<device>-<recipe>` section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_section  # noqa: E402

from distcluster.engine.checkpoint import verified_checkpoint  # noqa: E402


def run(recipe: str, data: str | None, workers: int, epochs: int, overrides: list[str],
        folder: Path) -> dict:
    out = folder / f"workers-{workers}-{time.monotonic_ns()}"
    argv = [sys.executable, "-m", "distcluster.train", "--config", recipe, "--workers", str(workers),
            "--epochs", str(epochs), "--set", "eval_every=0", "--set", f"checkpoint_every={epochs}",
            "--output", str(out), "--run-name", f"scaling-{workers}", "--experiment", "benchmark-scaling",
            "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}"]
    for override in overrides:
        argv += ["--set", override]
    if data:  # runs start in `folder`: a relative path is made absolute
        argv += ["--data", str(Path(data).resolve()) if Path(data).exists() else data]
    started = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, cwd=folder)
    command = time.perf_counter() - started
    summary = json.loads((out / "summary.json").read_text())
    history = verified_checkpoint(out / "checkpoint")["history"]
    steady = history[1:] or history  # the first epoch warms up
    return {"workers": workers, "command": command,
            "epochs_total": sum(h["train/epoch_seconds"] for h in history),
            "epoch": statistics.median(h["train/epoch_seconds"] for h in steady),
            "images_per_second": statistics.median(h["train/images_per_second"] for h in steady),
            "acc": summary["metrics"]["acc"], "device": summary["device"]}


def median_run(runs: list[dict]) -> dict:
    """The median of every number over repeated runs, and each run's epoch time."""
    numbers = [k for k, v in runs[0].items() if isinstance(v, float)]
    return {**runs[0], **{k: statistics.median(r[k] for r in runs) for k in numbers},
            "epochs_seen": [r["epoch"] for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="digits-imc-swav")
    parser.add_argument("--data", help="the recipe's data when not given")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    args = parser.parse_args()
    runs: dict[int, list[dict]] = {w: [] for w in args.workers}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for workers in args.workers:
                r = run(args.recipe, args.data, workers, args.epochs, args.overrides, Path(tmp))
                runs[workers].append(r)
                print(f"workers {workers}: epoch {r['epoch']:.3f} s, {r['images_per_second']:.0f} img/s, "
                      f"command {r['command']:.1f} s", flush=True)
    rows = [median_run(runs[w]) for w in args.workers]
    base = next((r for r in rows if r["workers"] == 0), None)
    one = next((r for r in rows if r["workers"] == 1), None)
    lines = [f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}.",
             f"Command: `.venv/bin/python benchmarks/scaling.py --recipe {args.recipe} "
             + (f"--data {args.data} " if args.data else "") + f"--epochs {args.epochs} "
             f"--workers {' '.join(map(str, args.workers))} --repeats {args.repeats}"
             + "".join(f" --set {o}" for o in args.overrides) + "` (each run: `python -m distcluster.train "
             f"--config {args.recipe} --workers W --epochs {args.epochs} --set eval_every=0`"
             + (" with the --data and --set above" if args.data or args.overrides else "") + "; epoch times "
             "are medians over epochs 2..E, then over the repeats; 'not in epochs' = command time - time in "
             "epochs: process, Ray and MLflow start-up, final evaluation and export).", "",
             "| workers | epoch s | epoch s of each repeat | images/s | epoch time vs in-process "
             "| command s | not in epochs s | final ACC |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        versus = f"{r['epoch'] / base['epoch'] - 1:+.1%}" if base else "-"
        each = ", ".join(f"{e:.3f}" for e in r["epochs_seen"])
        lines.append(f"| {r['workers']} | {r['epoch']:.3f} | {each} | {r['images_per_second']:,.0f} "
                     f"| {versus} | "
                     f"{r['command']:.1f} | {r['command'] - r['epochs_total']:.1f} | {r['acc']:.4f} |")
    if base and one:
        overhead = one["epoch"] / base["epoch"] - 1
        lines += ["", f"Ray overhead after start-up (1 worker vs in-process, per epoch): **{overhead:+.1%}** "
                      f"(target < 15%: {'met' if overhead < 0.15 else 'NOT met'})."]
    two = next((r for r in rows if r["workers"] == 2), None)
    if one and two:
        ratio = two["epoch"] / one["epoch"]
        lines += ["", f"2 workers vs 1, time per epoch: **{ratio:.2f}x** "
                      f"(target <= 1: {'met' if ratio <= 1.0 else 'NOT met'})."]
    table = "\n".join(lines)
    print(table)
    write_section(f"scaling-{rows[0]['device']}-{args.recipe}",
                  f"## Scaling: {', '.join(map(str, args.workers))} workers ({args.recipe})\n\n{table}")


if __name__ == "__main__":
    main()

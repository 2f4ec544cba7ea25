"""Images/s of `distcluster.predict` on the 50,000 CIFAR-10 JPEGs: one process, and Ray Data
with 1 and 2 actors.

    .venv/bin/python benchmarks/predict.py [--zip ../shared/data/cifar10-train-jpg.zip]
        [--config cifar10-cpu] [--actors 1 2]

Not timed: preparing the zip into a .beton and training a model for one short
epoch (predict speed does not depend on how good the model is). Timed: the
whole `python -m distcluster.predict --model DIR --data FILE.beton --out
FILE.parquet [--workers N]` command (start-up, Ray, loading, decoding, the
network, writing), and the network pass alone. Prints a table and updates the
`predict-<device>-<config>` section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_section  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-train-jpg.zip"


def run(*argv: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", *argv], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def network_only(model: Path, beton: Path, batch: int) -> tuple[int, float]:
    """predict's own assignment path (inference.batch.local_rows) on images decoded up front."""
    from distcluster.data.arrays import ArraySource
    from distcluster.data.ffcv_io import BetonSource
    from distcluster.engine.exported import load_model
    from distcluster.inference.batch import local_rows

    loaded, source = load_model(model), BetonSource(beton, threads=torch.get_num_threads())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    decoded = ArraySource(torch.cat(list(source.batches(batch))), None, "decoded")  # not timed
    started = time.perf_counter()
    for _rows in local_rows(loaded, decoded, 0, len(decoded), batch, device):
        pass
    return len(decoded), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zip", type=Path, default=SHARED)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--config", default="cifar10-cpu", help="the recipe of the model (its backbone)")
    parser.add_argument("--actors", type=int, nargs="*", default=[1, 2], help="Ray Data actor counts")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        beton = Path(tmp) / "cifar10.beton"
        run("distcluster.prepare", str(args.zip), "--out", str(beton), "--quiet")
        run("distcluster.train", "--config", args.config, "--data", str(beton), "--workers", "0",
            "--epochs", "1", "--set",
            "max_samples=512", "--batch-size", "128", "--output", f"{tmp}/run", "--tracking-uri",
            f"sqlite:///{tmp}/mlflow.db", *(["--gpu"] if device == "cuda" else []))
        model = Path(tmp) / "run" / "model"
        command = ["distcluster.predict", "--model", str(model), "--data", str(beton), "--batch-size",
                   str(args.batch_size), "--quiet"]
        timed = [("whole `distcluster.predict` command, one process",
                  run(*command, "--out", f"{tmp}/clusters.parquet"))]
        for actors in args.actors:
            timed.append((f"whole command, `--workers {actors}` (Ray Data actors, Ray start-up included)",
                          run(*command, "--workers", str(actors), "--out", f"{tmp}/actors-{actors}.parquet")))
        count, network = network_only(model, beton, args.batch_size)
    rows = [(name, count / seconds, seconds) for name, seconds in timed]
    rows.append(("network pass only (images decoded in memory)", count / network, network))
    lines = [f"Machine: {machine()}; device {device}. Date: {time.strftime('%Y-%m-%d')}.",
             f"Command: `.venv/bin/python benchmarks/predict.py --config {args.config}` "
             f"({count} CIFAR-10 images from a .beton, the {args.config} recipe's backbone, "
             f"batch {args.batch_size}).", "",
             "| what | images/s | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {speed:,.0f} | {secs:.1f} |" for name, speed, secs in rows]
    table = "\n".join(lines)
    print(table)
    write_section(f"predict-{device}-{args.config}",
                  f"## Predict throughput on {device}, {args.config} (issues 5, 18)\n\n{table}")


if __name__ == "__main__":
    main()

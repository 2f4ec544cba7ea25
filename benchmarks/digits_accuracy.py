"""ACC/NMI/ARI of each objective on the embedded digits, several seeds, 2 Ray workers.

    .venv/bin/python benchmarks/digits_accuracy.py [--objectives imc_swav iic crlc] [--seeds 0 1 2]

Each run is exactly `python -m distcluster.train --objective X --seed S` (the
recipe `digits-X`, 2 workers), so the numbers are what `make run` gives.
Prints a table and updates the `digits-accuracy` section of RESULTS.md.
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

TARGETS = {"imc_swav": "ACC >= 0.88, NMI >= 0.85", "iic": "ACC >= 0.82", "crlc": "ACC >= 0.82"}


def run(objective: str, seed: int, workers: int, folder: Path, overrides: list[str]) -> dict:
    out = folder / f"{objective}-{seed}"
    argv = [sys.executable, "-m", "distcluster.train", "--objective", objective, "--seed", str(seed),
            "--workers", str(workers), "--output", str(out), "--run-name", f"bench-{objective}-{seed}",
            "--experiment", "benchmark-digits", *[arg for o in overrides for arg in ("--set", o)]]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objectives", nargs="+", default=["imc_swav", "iic", "crlc"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="config override for every run (compare a variant with the recipe)")
    parser.add_argument("--label", default="", help="names the RESULTS.md section of a variant")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for objective in args.objectives:
            for seed in args.seeds:
                s = run(objective, seed, args.workers, Path(tmp), args.overrides)
                m = s["metrics"]
                rows.append((objective, seed, m["acc"], m["nmi"], m["ari"], s["epochs"],
                             s["fit_seconds"], s["train_images_per_second"]))
                print("{} seed {}: ACC {:.4f} NMI {:.4f} ARI {:.4f} ({} epochs, {:.0f} s, {:.0f} img/s)"
                      .format(*rows[-1]), flush=True)
    lines = [f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}.",
             f"Command: `.venv/bin/python benchmarks/digits_accuracy.py --objectives "
             f"{' '.join(args.objectives)} --seeds {' '.join(map(str, args.seeds))}"
             + "".join(f" --set '{o}'" for o in args.overrides)
             + (f" --label {args.label}" if args.label else "") + "` "
             f"(each run: `python -m distcluster.train --objective X --seed S`, "
             f"{args.workers} Ray workers, recipe `digits-X`).",
             "Training seconds = Ray start-up + all epochs + per-epoch evaluation.", "",
             "| objective | seed | ACC | NMI | ARI | epochs | training s | images/s |",
             "|---|---|---|---|---|---|---|---|"]
    lines += ["| {} | {} | {:.4f} | {:.4f} | {:.4f} | {} | {:.0f} | {:.0f} |".format(*r) for r in rows]
    lines += ["", "| objective | median ACC | median NMI | min ACC | target |", "|---|---|---|---|---|"]
    for objective in args.objectives:
        mine = [r for r in rows if r[0] == objective]
        lines.append(f"| {objective} | {statistics.median(r[2] for r in mine):.4f} | "
                     f"{statistics.median(r[3] for r in mine):.4f} | {min(r[2] for r in mine):.4f} | "
                     f"{TARGETS.get(objective, '')} |")
    table = "\n".join(lines)
    print(table)
    section = "digits-accuracy-" + "-".join(args.objectives) + (f"-{args.label}" if args.label else "")
    title = ", ".join(args.objectives) + (f"; {args.label}: {' '.join(args.overrides)}" if args.label else "")
    write_section(section, f"## Digits accuracy ({title})\n\n{table}")


if __name__ == "__main__":
    main()

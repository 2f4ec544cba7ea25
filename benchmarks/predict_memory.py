"""Peak memory of `distcluster.predict`, one process and `--workers 2`, on inputs of several sizes.

    .venv/bin/python benchmarks/predict_memory.py MODEL A.beton B.beton ...

Peak RSS summed over the command's process tree (with Ray: the driver, Ray's daemons and
the actors; shared memory is counted once per process, so the Ray rows overstate),
sampled every 0.2 s. Prints one table row per run.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time

import psutil


def peak_mib(argv: list[str]) -> float:
    """The largest RSS sum of the process tree of `argv` while it runs."""
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root, best = psutil.Process(process.pid), 0
    while process.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            best = max(best, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.2)
    if process.returncode != 0:
        raise SystemExit(f"failed: {' '.join(argv)}")
    return best / 2**20


def main() -> None:
    model, *betons = sys.argv[1:]
    print("| input | path | peak RSS |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for beton in betons:
            for extra in ([], ["--workers", "2"]):
                argv = [sys.executable, "-m", "distcluster.predict", "--model", model, "--data", beton,
                        "--out", f"{tmp}/rows.parquet", "--quiet", *extra]
                path = "--workers 2" if extra else "one process"
                print(f"| {beton} | {path} | {peak_mib(argv):,.0f} MiB |", flush=True)


if __name__ == "__main__":
    main()

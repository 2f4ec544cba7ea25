"""Cost per image of every stage as the pile grows: 10k, 100k and 1M synthetic JPEGs.

    .venv/bin/python benchmarks/scale.py [--sizes 10000 100000 1000000] [--steps 40]
        [--folder /tmp/distcluster-scale] [--keep]

For each size it writes a deterministic pile of 32x32 JPEGs in 10 class folders (image i: a
colour gradient of class i % 10 under noise drawn from seed i), then times, each as the user's
own command under /usr/bin/time (wall clock and peak RSS of the command's process):

- prepare: `distcluster.prepare DIR --out DIR.beton`, per image of the pile;
- train, 1 and 2 workers: `distcluster.train --config cifar10-cpu --epochs 1 --set
  steps_per_epoch=S` (S steps of 256 images whatever the pile's size), per trained image,
  the run's final full evaluation left out (it is the next stage);
- evaluation: that final evaluation of every image (eval/seconds of the run: at 2 workers each
  assigns its share), per image of the pile;
- predict: `distcluster.predict --workers 2` (Ray Data) of every image, per image.

The serial share is the 2-worker run's (summary.json). With 2 workers the peak RSS is the
driver's; the workers' is not measured. The pile and its .beton are deleted after each size
unless --keep. Prints a table and updates the `scale-cpu` section of RESULTS.md. The 1M size
takes about an hour on 2 cores: run it alone.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_section  # noqa: E402

CLASSES, SIDE, BATCH = 10, 32, 256


def synthetic_image(index: int) -> np.ndarray:
    """(32, 32, 3) uint8: class index % 10's colour gradient, with noise drawn from seed index."""
    label = index % CLASSES
    rng = np.random.default_rng(index)
    ramp = np.linspace(0, 1, SIDE)
    hue = np.array([label / CLASSES, 1 - label / CLASSES, (label % 3) / 2])
    base = (ramp[:, None, None] * hue + ramp[None, :, None] * (1 - hue)) * 200
    return np.clip(base + rng.normal(0, 25, (SIDE, SIDE, 3)), 0, 255).astype(np.uint8)


def _write_range(args: tuple[Path, int, int]) -> None:
    from PIL import Image

    folder, start, stop = args
    for index in range(start, stop):
        Image.fromarray(synthetic_image(index)).save(folder / f"class{index % CLASSES}" / f"{index:07d}.jpg",
                                                     quality=90)


def make_pile(folder: Path, count: int) -> None:
    for label in range(CLASSES):
        (folder / f"class{label}").mkdir(parents=True, exist_ok=True)
    chunks = [(folder, start, min(count, start + 5000)) for start in range(0, count, 5000)]
    with multiprocessing.Pool(2) as pool:
        pool.map(_write_range, chunks)


def timed(argv: list[str], cwd: Path) -> dict[str, float | str]:
    """Wall seconds and peak RSS (GiB) of a command; its stdout."""
    done = subprocess.run(["/usr/bin/time", "-v", *argv], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1)) / 2**20
    clock = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", done.stderr).group(1)
    seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(clock.split(":"))))
    return {"seconds": seconds, "rss": rss, "stdout": done.stdout}


def train(beton: Path, workers: int, steps: int, folder: Path) -> dict[str, float]:
    name = f"train-{workers}"
    run = timed([sys.executable, "-m", "distcluster.train", "--config", "cifar10-cpu", "--data", str(beton),
                 "--workers", str(workers), "--epochs", "1", "--set", f"steps_per_epoch={steps}",
                 "--output", str(folder / name), "--run-name", name,
                 "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}"], folder)
    summary = json.loads((folder / name / "summary.json").read_text())
    import torch

    last = torch.load(folder / name / "checkpoint" / "checkpoint.pt", weights_only=True)["history"][-1]
    return {"seconds": run["seconds"], "rss": run["rss"], "eval_seconds": last["eval/seconds"],
            "serial_share": summary["serial_share"], "acc": summary["metrics"]["acc"]}


def measure(count: int, steps: int, root: Path, keep: bool) -> dict[str, float]:
    folder = root / f"pile-{count}"
    pile = folder / "images"
    started = time.perf_counter()
    make_pile(pile, count)
    print(f"{count}: pile written in {time.perf_counter() - started:.0f} s", flush=True)
    beton = folder / "pile.beton"
    prepare = timed([sys.executable, "-m", "distcluster.prepare", str(pile), "--out", str(beton), "--quiet"],
                    folder)
    row = {"count": count, "prepare": prepare["seconds"] / count, "prepare_rss": prepare["rss"]}
    trained = steps * BATCH
    for workers in (0, 2):
        run = train(beton, workers, steps, folder)
        key = "train1" if workers == 0 else "train2"
        row[key] = (run["seconds"] - run["eval_seconds"]) / trained
        row[f"{key}_rss"] = run["rss"]
        row[f"eval{key[-1]}"] = run["eval_seconds"] / count
        if workers:
            row["serial_share"] = run["serial_share"]
    model = folder / "train-0" / "model"
    predict = timed([sys.executable, "-m", "distcluster.predict", "--model", str(model), "--data", str(beton),
                     "--workers", "2", "--out", str(folder / "clusters.parquet"), "--quiet"], folder)
    row.update(predict=predict["seconds"] / count, predict_rss=predict["rss"])
    print(row, flush=True)
    if not keep:
        shutil.rmtree(folder)
    return row


def table(rows: list[dict[str, float]]) -> list[str]:
    lines = ["| images | prepare (ms/img) | train 1 worker (ms/trained img) | train 2 workers | "
             "evaluation 1 worker (ms/img) | evaluation 2 workers | predict 2 workers (ms/img) | "
             "peak RSS GiB: prepare / train 1 / train 2 (driver) / predict (driver) | "
             "serial share, 2 workers |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['count']:,} | {1e3 * r['prepare']:.3f} | {1e3 * r['train1']:.3f} | "
                     f"{1e3 * r['train2']:.3f} | {1e3 * r['eval1']:.3f} | {1e3 * r['eval2']:.3f} | "
                     f"{1e3 * r['predict']:.3f} | {r['prepare_rss']:.2f} / {r['train1_rss']:.2f} / "
                     f"{r['train2_rss']:.2f} / {r['predict_rss']:.2f} | {100 * r['serial_share']:.2f}% |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/distcluster-scale"))
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    rows = [measure(count, args.steps, args.folder, args.keep) for count in args.sizes]
    body = "\n".join([
        "## Scale: cost per image from 10k to 1M images (issue 33)", "",
        f"Machine: {machine()}. Synthetic 32x32 JPEGs in 10 class folders; cifar10-cpu recipe, "
        f"{args.steps} training steps of {BATCH} images. Times are wall clock of the user's command.", "",
        f"    .venv/bin/python benchmarks/scale.py --sizes {' '.join(map(str, args.sizes))} "
        f"--steps {args.steps}",
        "", *table(rows)])
    print(body)
    write_section("scale-cpu", body)


if __name__ == "__main__":
    main()

"""Cost per image of every stage as the pile grows: 10k, 100k and 1M synthetic JPEGs.

    .venv/bin/python benchmarks/scale.py [--sizes 10000 100000 1000000] [--steps 40]
        [--folder /tmp/distcluster-scale] [--keep]

For each size it writes a deterministic pile of 32x32 JPEGs in 10 class folders (image i: a
colour gradient of class i % 10 under noise drawn from seed i), then times, each as the user's
own command under /usr/bin/time (wall clock and peak RSS of the command's process) while a
thread samples, once a second, the anonymous memory of every process under it:

- prepare: `distcluster.prepare DIR --out DIR.beton`, per image of the pile;
- train, 1 and 2 workers: `distcluster.train --config cifar10-cpu --epochs 1 --set
  steps_per_epoch=S` (S steps of 256 images whatever the pile's size), per trained image,
  the run's final full evaluation left out (it is the next stage);
- evaluation: that final evaluation of every image (eval/seconds of the run: at 2 workers each
  assigns its share), per image of the pile;
- predict: `distcluster.predict --workers 2` (Ray Data) of every image, per image.

The serial share is the 2-worker run's (summary.json). Training also gives the largest
worker's peak RSS (summary.json's worker_peak_rss_gib). RSS counts the mapped .beton's pages
that were read, which grow with the file; anonymous memory is what the processes hold. The
pile and its .beton are deleted after each size unless --keep. Prints the tables and updates
the `scale-cpu` section of RESULTS.md. The 1M size takes about an hour on 2 cores: run it alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import re
import shutil
import subprocess
import sys
import threading
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


def _anonymous_kib(pids: list[int]) -> dict[int, int]:
    """RssAnon of each live process (the heap and stacks: not the pages of a mapped data file,
    which the kernel can drop and RSS counts too)."""
    found = {}
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        match = re.search(r"RssAnon:\s+(\d+) kB", status)
        if match:
            found[pid] = int(match.group(1))
    return found


def _descendants(root: int) -> list[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                parents[int(entry.name)] = int(re.search(r"PPid:\s+(\d+)", (entry / "status").read_text())[1])
    tree, grew = {root}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    return sorted(tree)


class AnonymousPeak:
    """While a command runs, once a second: the anonymous memory of every process under it (Ray's
    raylet starts the workers, so they are under the command that started Ray); the largest of
    one process and of all of them together, in GiB."""

    def __init__(self, root: int) -> None:
        self.root, self.largest, self.together = root, 0.0, 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.stop.wait(1.0):
            sizes = _anonymous_kib(_descendants(self.root))
            if sizes:
                self.largest = max(self.largest, max(sizes.values()) / 2**20)
                self.together = max(self.together, sum(sizes.values()) / 2**20)

    def finish(self) -> tuple[float, float]:
        self.stop.set()
        self.thread.join()
        return self.largest, self.together


def timed(argv: list[str], cwd: Path) -> dict[str, float | str]:
    """Wall seconds, peak RSS (GiB, /usr/bin/time's, the command's own process) and peak anonymous
    memory (AnonymousPeak) of a command; its stdout."""
    process = subprocess.Popen(["/usr/bin/time", "-v", *argv], cwd=cwd, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    peak = AnonymousPeak(process.pid)
    stdout, stderr = process.communicate()
    largest, together = peak.finish()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr).group(1)) / 2**20
    clock = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", stderr).group(1)
    seconds = sum(float(part) * 60**i for i, part in enumerate(reversed(clock.split(":"))))
    return {"seconds": seconds, "rss": rss, "anon": largest, "anon_all": together, "stdout": stdout}


STAGES = ("prepare", "train1", "train2", "predict")


def train(beton: Path, workers: int, steps: int, folder: Path) -> dict[str, float]:
    name = f"train-{workers}"
    run = timed([sys.executable, "-m", "distcluster.train", "--config", "cifar10-cpu", "--data", str(beton),
                 "--workers", str(workers), "--epochs", "1", "--set", f"steps_per_epoch={steps}",
                 "--output", str(folder / name), "--run-name", name,
                 "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}"], folder)
    summary = json.loads((folder / name / "summary.json").read_text())
    import torch

    last = torch.load(folder / name / "checkpoint" / "checkpoint.pt", weights_only=True)["history"][-1]
    return {**run, "eval_seconds": last["eval/seconds"], "serial_share": summary["serial_share"],
            "worker_rss": summary["worker_peak_rss_gib"]}


def measure(count: int, steps: int, root: Path, keep: bool) -> dict[str, float]:
    folder = root / f"pile-{count}"
    pile = folder / "images"
    started = time.perf_counter()
    make_pile(pile, count)
    print(f"{count}: pile written in {time.perf_counter() - started:.0f} s", flush=True)
    beton = folder / "pile.beton"
    runs = {"prepare": timed([sys.executable, "-m", "distcluster.prepare", str(pile), "--out", str(beton),
                              "--quiet"], folder)}
    runs["train1"], runs["train2"] = (train(beton, workers, steps, folder) for workers in (0, 2))
    model = folder / "train-0" / "model"
    runs["predict"] = timed([sys.executable, "-m", "distcluster.predict", "--model", str(model), "--data",
                             str(beton), "--workers", "2", "--out", str(folder / "clusters.parquet"),
                             "--quiet"], folder)
    trained = steps * BATCH
    row = {"count": count, "prepare": runs["prepare"]["seconds"] / count,
           "predict": runs["predict"]["seconds"] / count, "serial_share": runs["train2"]["serial_share"]}
    for key in ("train1", "train2"):
        row[key] = (runs[key]["seconds"] - runs[key]["eval_seconds"]) / trained
        row[f"eval{key[-1]}"] = runs[key]["eval_seconds"] / count
        row[f"{key}_worker_rss"] = runs[key]["worker_rss"]
    for stage in STAGES:
        row.update({f"{stage}_{k}": runs[stage][k] for k in ("rss", "anon", "anon_all")})
    print(row, flush=True)
    if not keep:
        shutil.rmtree(folder)
    return row


def time_table(rows: list[dict[str, float]]) -> list[str]:
    lines = ["| images | prepare (ms/img) | train 1 worker (ms/trained img) | train 2 workers | "
             "evaluation 1 worker (ms/img) | evaluation 2 workers | predict 2 workers (ms/img) | "
             "serial share, 2 workers |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['count']:,} | {1e3 * r['prepare']:.3f} | {1e3 * r['train1']:.3f} | "
                     f"{1e3 * r['train2']:.3f} | {1e3 * r['eval1']:.3f} | {1e3 * r['eval2']:.3f} | "
                     f"{1e3 * r['predict']:.3f} | {100 * r['serial_share']:.2f}% |")
    return lines


def memory_table(rows: list[dict[str, float]]) -> list[str]:
    lines = ["| images | stage | peak RSS of the command's process | largest worker's peak RSS | "
             "peak anonymous, largest process | peak anonymous, all its processes |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        for stage in STAGES:
            worker = f"{r[f'{stage}_worker_rss']:.2f}" if f"{stage}_worker_rss" in r else "-"
            lines.append(f"| {r['count']:,} | {stage} | {r[f'{stage}_rss']:.2f} | {worker} | "
                         f"{r[f'{stage}_anon']:.2f} | {r[f'{stage}_anon_all']:.2f} |")
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
        f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}. Synthetic 32x32 JPEGs in 10 class "
        f"folders; cifar10-cpu recipe, {args.steps} training steps of {BATCH} images. Times are wall "
        "clock of the user's command.", "",
        f"    .venv/bin/python benchmarks/scale.py --sizes {' '.join(map(str, args.sizes))} "
        f"--steps {args.steps}",
        "", *time_table(rows), "",
        "Memory in GiB. RSS counts the pages of the memory-mapped .beton that were read (the kernel "
        "drops them under pressure); anonymous memory (RssAnon: heaps, stacks) is what a process "
        "holds, sampled once a second over every process the command started (Ray's included).", "",
        *memory_table(rows)])
    print(body)
    write_section("scale-cpu", body)


if __name__ == "__main__":
    main()

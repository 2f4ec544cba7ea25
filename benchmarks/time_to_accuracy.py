"""ACC/NMI/ARI against wall-clock time for one recipe, on the training images and held-out ones.

    .venv/bin/python benchmarks/time_to_accuracy.py --recipe cifar10-imc-swav-fast --minutes 20 \\
        [--data cifar10-train.beton] [--eval-data cifar10-test.beton] [--workers 0] [--set KEY=VALUE ...]

Runs `python -m distcluster.train --config RECIPE --workers W` (in-process by
default: one GPU needs no Ray) with an evaluation after every epoch, and stops
it after `--minutes` (SIGINT; checkpoints are atomic) unless it ends first. The
clock starts when the command is launched, so start-up, data preparation and
evaluations all count. Training-image scores come from the run's per-epoch
MLflow metrics (as IIC reports them); every checkpoint is copied as it appears
and, with `--eval-data`, scored afterwards on those images (never trained on)
through `python -m distcluster.evaluate`. Prints a table, writes a PNG next to
RESULTS.md and updates the `time-to-accuracy-<recipe>` section.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, write_section  # noqa: E402

from distcluster import plots  # noqa: E402
from distcluster.cli import run_command  # noqa: E402
from distcluster.errors import RunFailed, UserError  # noqa: E402
from distcluster.sources import open_source, resolve_data  # noqa: E402

MAX_HELD_OUT_POINTS = 12


def train(args, folder: Path) -> tuple[float, list[tuple[float, Path]], bool]:
    """Run training for at most args.minutes; returns the launch time, (minutes, checkpoint copy)
    for every checkpoint seen, and whether the time ran out (else it finished)."""
    argv = [sys.executable, "-m", "distcluster.train", "--config", args.recipe,
            "--workers", str(args.workers), "--set", "eval_every=1", "--set", "checkpoint_every=1",
            "--output", str(folder / "out"),
            "--run-name", "time-to-accuracy", "--experiment", "benchmark-time-to-accuracy",
            "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}"]
    argv += ["--data", args.data] if args.data else []
    for override in args.overrides:
        argv += ["--set", override]
    launched = time.time()
    process = subprocess.Popen(argv, cwd=folder)
    snapshots: dict[str, tuple[float, Path]] = {}
    deadline = launched + args.minutes * 60
    stopped = False
    while process.poll() is None:
        if time.time() > deadline:
            process.send_signal(signal.SIGINT)
            process.wait()
            stopped = True
            break
        copy_new_checkpoints(folder, snapshots, launched)
        time.sleep(1)
    if not stopped and process.returncode != 0:
        raise RunFailed(f"training exited with code {process.returncode} (its message is above)")
    copy_new_checkpoints(folder, snapshots, launched)  # those written since the last look
    return launched, sorted(snapshots.values()), stopped


def copy_new_checkpoints(folder: Path, snapshots: dict[str, tuple[float, Path]], launched: float) -> None:
    """Copy every complete checkpoint not seen yet, with its minutes since launch."""
    for found in sorted((folder / "out" / "checkpoints").glob("epoch-*")):
        if found.name not in snapshots and (found / "checkpoint.json").exists():
            copy = folder / "snapshots" / found.name
            try:
                shutil.copytree(found, copy)
                snapshots[found.name] = ((found.stat().st_mtime - launched) / 60, copy)
            except OSError:  # rotated away meanwhile (training keeps the last two)
                shutil.rmtree(copy, ignore_errors=True)


def training_curve(folder: Path, launched: float) -> list[tuple[float, dict[str, float]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("benchmark-time-to-accuracy").experiment_id])[0]
    history = {key: client.get_metric_history(run.info.run_id, f"eval/{key}")
               for key in ("acc", "nmi", "ari")}
    points = []
    for acc, nmi, ari in zip(history["acc"], history["nmi"], history["ari"], strict=True):
        points.append(((acc.timestamp / 1000 - launched) / 60, {"acc": acc.value, "nmi": nmi.value,
                                                                 "ari": ari.value, "epoch": acc.step}))
    return points


def check_eval_data(spec: str) -> None:
    """Fail before training, not after it, when the held-out images cannot be scored."""
    if open_source(resolve_data(spec)).labels is None:
        raise UserError(f"--eval-data '{spec}' has no labels to score against")


def held_out_curve(snapshots: list[tuple[float, Path]], data: str) -> list[tuple[float, dict[str, float]]]:
    step = max(1, -(-len(snapshots) // MAX_HELD_OUT_POINTS))
    chosen = snapshots[::-1][::step][::-1]  # evenly spaced, always the last one
    points = []
    for minutes, checkpoint in chosen:
        done = subprocess.run([sys.executable, "-m", "distcluster.evaluate", "--model", str(checkpoint),
                               "--data", data], capture_output=True, text=True)
        if done.returncode != 0:
            why = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise UserError(f"scoring {checkpoint.name} on --eval-data '{data}' failed: {why}")
        scores = json.loads(done.stdout.strip().splitlines()[-1])
        points.append((minutes, {**scores, "epoch": int(checkpoint.name.split("-")[1])}))
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--minutes", type=float, required=True)
    parser.add_argument("--data", help="training data SPEC (default: the recipe's)")
    parser.add_argument("--eval-data", help="held-out data SPEC with labels, scored at every checkpoint")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    args = parser.parse_args()
    if args.eval_data:
        check_eval_data(args.eval_data)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        launched, snapshots, stopped = train(args, folder)
        if not snapshots:
            raise UserError(f"no epoch finished within {args.minutes:g} minutes; give --minutes more")
        curves = {"training images": training_curve(folder, launched)}
        if args.eval_data:
            curves[f"held out: {args.eval_data}"] = held_out_curve(snapshots, args.eval_data)
    how = f"stopped after {args.minutes:g} min" if stopped else "finished"
    lines = [f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}.",
             f"Command: `.venv/bin/python benchmarks/time_to_accuracy.py --recipe {args.recipe} "
             f"--minutes {args.minutes:g}" + (f" --data {args.data}" if args.data else "")
             + (f" --eval-data {args.eval_data}" if args.eval_data else "")
             + f" --workers {args.workers}" + "".join(f" --set {o}" for o in args.overrides)
             + f"` (training {how}; minutes count from the command's launch).", ""]
    for name, points in curves.items():
        lines += [f"**{name}**", "", "| minutes | epoch | ACC | NMI | ARI |", "|---|---|---|---|---|"]
        lines += [f"| {m:.2f} | {s['epoch']} | {s['acc']:.4f} | {s['nmi']:.4f} | {s['ari']:.4f} |"
                  for m, s in points]
        best = max(points, key=lambda p: p[1]["acc"])
        lines += ["", f"Best ACC {best[1]['acc']:.4f} at {best[0]:.2f} min.", ""]
    image = RESULTS.with_name(f"time_to_accuracy-{args.recipe}.png")
    plots.time_curves(curves, image)
    lines.append(f"![ACC/NMI/ARI against minutes]({image.name})")
    table = "\n".join(lines)
    print(table)
    title = f"## Time to accuracy: {args.recipe} (issue 7)"
    write_section(f"time-to-accuracy-{args.recipe}", f"{title}\n\n{table}")


if __name__ == "__main__":
    raise SystemExit(run_command("time_to_accuracy.py", main))

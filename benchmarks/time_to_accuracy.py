"""ACC/NMI/ARI against wall-clock time for recipes and seeds, on the training images and held-out ones.

    .venv/bin/python benchmarks/time_to_accuracy.py --recipe cifar10-imc-swav-fast [MORE ...] --minutes 20 \\
        [--seeds 0 1 2] [--data cifar10-train.beton] [--eval-data cifar10-test.beton] [--workers 0]
        [--keep DIR [--cached-only]] [--set KEY=VALUE ...]

Runs `python -m distcluster.train --config RECIPE --workers W` (in-process by
default: one GPU needs no Ray) with an evaluation after every epoch, and stops
it after `--minutes` (SIGINT; checkpoints are atomic) unless it ends first. The
clock starts when the command is launched, so start-up, data preparation and
evaluations all count. Training-image scores come from the run's per-epoch
MLflow metrics (as IIC reports them); every checkpoint is copied as it appears
and, with `--eval-data`, scored afterwards on those images (never trained on)
through `python -m distcluster.evaluate`. Each (recipe, seed) runs in turn; with `--keep`
its result is saved there and reused by a later invocation (`--cached-only` reports the
saved runs alone). Prints the tables (a summary of the last held-out point of every run
and the median over seeds), writes one PNG of every run's ACC against minutes next to
RESULTS.md and updates the `time-to-accuracy-<recipes>` section.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, write_section  # noqa: E402

from distcluster.commands.cli import run_command  # noqa: E402
from distcluster.common.errors import RunFailed, UserError  # noqa: E402
from distcluster.data.sources import open_source, resolve_data  # noqa: E402
from distcluster.tracking import plots

MAX_HELD_OUT_POINTS = 12


def train(args, folder: Path, recipe: str, seed: int | None) -> tuple[float, list[tuple[float, Path]], bool]:
    """Run training for at most args.minutes; returns the launch time, (minutes, checkpoint copy)
    for every checkpoint seen, and whether the time ran out (else it finished)."""
    argv = [sys.executable, "-m", "distcluster.train", "--config", recipe,
            "--workers", str(args.workers), "--set", "eval_every=1", "--set", "checkpoint_every=1",
            "--output", str(folder / "out"),
            "--run-name", "time-to-accuracy", "--experiment", "benchmark-time-to-accuracy",
            "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}"]
    argv += ["--data", args.data] if args.data else []
    argv += ["--seed", str(seed)] if seed is not None else []
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


def run_one(args, recipe: str, seed: int | None) -> dict:
    """Train one (recipe, seed) and score its curves; the result as a JSON-able dict."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        launched, snapshots, stopped = train(args, folder, recipe, seed)
        if not snapshots:
            raise UserError(f"no epoch finished within {args.minutes:g} minutes; give --minutes more")
        curves = {"training images": training_curve(folder, launched)}
        if args.eval_data:
            curves["held out"] = held_out_curve(snapshots, args.eval_data)
    return {"recipe": recipe, "seed": seed, "stopped": stopped, "curves": curves}


def recipe_label(recipe: str) -> str:
    """A packaged recipe's name, or a recipe file's name without folder and suffix."""
    return Path(recipe).stem if recipe.endswith((".yaml", ".yml")) else recipe


def cached_run(args, recipe: str, seed: int | None) -> dict:
    """run_one, or its result saved by an earlier invocation in --keep (a long sweep survives
    an interruption)."""
    saved = Path(args.keep) / f"{recipe_label(recipe)}-seed{seed}.json" if args.keep else None
    if saved is not None and saved.is_file():
        print(f"{recipe} seed {seed}: reusing {saved}")
        return json.loads(saved.read_text())
    result = run_one(args, recipe, seed)
    if saved is not None:
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(result))
    return result


def curve_table(points: list) -> list[str]:
    lines = ["| minutes | epoch | ACC | NMI | ARI |", "|---|---|---|---|---|"]
    lines += [f"| {m:.2f} | {s['epoch']} | {s['acc']:.4f} | {s['nmi']:.4f} | {s['ari']:.4f} |"
              for m, s in points]
    return lines


def summary_table(results: list[dict]) -> list[str]:
    """The last held-out point of every run, and the median over seeds of each recipe."""
    lines = ["| recipe | seed | minutes | epochs | held-out ACC | NMI | ARI |",
             "|---|---|---|---|---|---|---|"]
    by_recipe: dict[str, list[float]] = {}
    for result in results:
        minutes, last = result["curves"]["held out"][-1]
        by_recipe.setdefault(result["recipe"], []).append(last["acc"])
        lines.append(f"| {result['recipe']} | {result['seed']} | {minutes:.1f} | {last['epoch']} | "
                     f"{last['acc']:.4f} | {last['nmi']:.4f} | {last['ari']:.4f} |")
    lines.append("")
    lines += [f"Median held-out ACC of {recipe}: **{statistics.median(accs):.4f}** over {len(accs)} "
              f"seed(s) (min {min(accs):.4f}, max {max(accs):.4f})." for recipe, accs in by_recipe.items()]
    return lines


def report(args, results: list[dict]) -> str:
    command = (f".venv/bin/python benchmarks/time_to_accuracy.py --recipe {' '.join(args.recipe)} "
               f"--minutes {args.minutes:g}"
               + (f" --seeds {' '.join(map(str, args.seeds))}" if args.seeds else "")
               + (f" --data {args.data}" if args.data else "")
               + (f" --eval-data {args.eval_data}" if args.eval_data else "")
               + f" --workers {args.workers}" + "".join(f" --set {o}" for o in args.overrides))
    lines = [f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}.",
             f"Command: `{command}` (each run stops at --minutes or when its epochs end; minutes "
             "count from the command's launch: start-up, data loading and evaluations included).", ""]
    if args.eval_data:
        lines += summary_table(results) + [""]
    for result in results:
        how = f"stopped after {args.minutes:g} min" if result["stopped"] else "finished"
        for name, points in result["curves"].items():
            title = f"**{result['recipe']}, seed {result['seed']}, {name}** ({how})"
            lines += [title, "", *curve_table(points), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", required=True, nargs="+", help="recipes, run one after another")
    parser.add_argument("--minutes", type=float, required=True, help="the limit of each run")
    parser.add_argument("--seeds", type=int, nargs="+", help="run each recipe once per seed")
    parser.add_argument("--data", help="training data SPEC (default: the recipe's)")
    parser.add_argument("--eval-data", help="held-out data SPEC with labels, scored at every checkpoint")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--keep", help="folder for each run's result: an interrupted sweep resumes")
    parser.add_argument("--cached-only", action="store_true", help="report the runs in --keep, run none")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    args = parser.parse_args()
    if args.cached_only and not args.keep:
        raise UserError("--cached-only needs --keep")
    if args.eval_data:
        check_eval_data(args.eval_data)
    runs = [(recipe, seed) for recipe in args.recipe for seed in (args.seeds or [None])]
    if args.cached_only:
        runs = [(r, s) for r, s in runs if (Path(args.keep) / f"{recipe_label(r)}-seed{s}.json").is_file()]
    results = [cached_run(args, recipe, seed) for recipe, seed in runs]
    name = "-".join(recipe_label(r) for r in args.recipe)
    image = RESULTS.with_name(f"time_to_accuracy-{name}.png")
    shown = "held out" if args.eval_data else "training images"
    plots.held_out_curves({f"{r['recipe']} seed {r['seed']}": r["curves"][shown] for r in results}, image,
                          f"ACC on {shown}")
    table = report(args, results) + f"\n![ACC/NMI/ARI against minutes]({image.name})"
    print(table)
    write_section(f"time-to-accuracy-{name}", f"## Time to accuracy: {', '.join(args.recipe)}\n\n{table}")


if __name__ == "__main__":
    raise SystemExit(run_command("time_to_accuracy.py", main))

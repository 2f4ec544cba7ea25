"""A finished sweep's trials and how well label-free scores rank them, as a RESULTS.md section.

    .venv/bin/python benchmarks/sweep_report.py SWEEP_FOLDER --name NAME --command "THE TUNE COMMAND" \\
        [--minutes M]

SWEEP_FOLDER is a `tune` output folder (tune_summary.json). One row per finished trial (its
sampled values, consensus, view_mi, ACC on its training images and, with --eval-data, on the
held-out images), then for each label-free score (the consensus tune picks by, and view_mi
alone) Spearman's rho against the ACC the sweep was scored by and the ACC of its pick against
the best. No training: seconds. Prints the section and updates `tune-NAME` in RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_section  # noqa: E402

from distcluster.core.metrics import selection_quality  # noqa: E402

SCORES = ("consensus", "view_mi")  # label-free, each finished trial has both


def shown(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else "n/a" if value is None else str(value)


def trial_table(trials: list[dict], acc: str) -> list[str]:
    keys = list(trials[0]["config"])
    lines = ["| trial | " + " | ".join(keys) + " | consensus | view_mi | ACC (training images) | "
             f"{acc} |", "|---" * (len(keys) + 5) + "|"]
    for t in sorted(trials, key=lambda t: -t[acc]):
        lines.append(f"| {t['trial_id']} | " + " | ".join(shown(v) for v in t["config"].values())
                     + f" | {t['consensus']:.4f} | {t['view_mi']:.4f} | {shown(t['acc'])} | {t[acc]:.4f} |")
    return lines


def ranking_lines(trials: list[dict], acc: str, tune_pick: str | None) -> list[str]:
    """`tune_pick`: the trial tune picked without labels (at the recommended K, ties by view_mi)."""
    accs = [t[acc] for t in trials]
    ids = [t["trial_id"] for t in trials]
    lines = []
    for score in SCORES:
        values = [t[score] for t in trials]
        picked = ids.index(tune_pick) if score == "consensus" and tune_pick else values.index(max(values))
        q = selection_quality(values, accs, picked)
        rho = "n/a" if q["spearman"] is None else f"{q['spearman']:.3f}"
        lines.append(f"- {score}: Spearman with {acc} **{rho}**; its pick {trials[picked]['trial_id']} "
                     f"has {acc} {q['picked_acc']:.4f} against the best {q['best_acc']:.4f} "
                     f"(gap **{q['gap']:.4f}**)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--command", required=True, help="the tune command that made the sweep, as shown")
    parser.add_argument("--minutes", type=float, help="the sweep's wall time, when measured outside it")
    args = parser.parse_args()
    summary = json.loads((args.folder / "tune_summary.json").read_text())
    trials = [t for t in summary["trials"] if t["status"] == "completed"]
    acc = "held_out_acc" if all(t.get("held_out_acc") is not None for t in trials) else "acc"
    if len(trials) < 2 or any(t[acc] is None for t in trials):
        raise SystemExit(f"{args.folder}: fewer than 2 finished trials, or trials without labels: "
                         "nothing to rank")
    quality = summary.get("label_free_vs_acc")
    minutes = args.minutes or summary["wall_seconds"] / 60
    body = "\n".join([
        f"## Sweep: {summary['space']} ({args.name})\n",
        f"Machine: {machine()}. Command: `{args.command}` ({len(trials)} of {len(summary['trials'])} "
        f"trials finished, {summary['stopped_early']} stopped early; {minutes:.1f} min).\n",
        *trial_table(trials, acc), "",
        "How the label-free scores rank the finished trials:\n",
        *ranking_lines(trials, acc, quality["picked"] if quality else None),
    ])
    print(body)
    write_section(f"tune-{args.name}", body)


if __name__ == "__main__":
    main()

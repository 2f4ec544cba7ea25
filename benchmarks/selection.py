"""Does the label-free score pick good models? A Tune sweep on digits, scored both ways.

    .venv/bin/python benchmarks/selection.py [--space digits-imc-swav] [--samples 12] [--search random]

Runs `python -m distcluster.tune --space SPACE --select unsupervised` with early
stopping off (grace period = the trials' epochs), so that every trial trains
to the end and both are measured on the same final models. Reports the
Spearman correlation between the label-free score (consensus) and ACC across
trials, the same for view_mi alone and for view_mi x consensus (the product
this score replaced), and the ACC of each one's pick against the best ACC.
Prints a table and updates the `selection` section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_section  # noqa: E402

from distcluster.cluster.search_space import load_space  # noqa: E402


def sweep(space: str, samples: int, search: str, seed: int, folder: Path) -> dict:
    """Run the sweep into `folder` and return its tune_summary.json."""
    folder.mkdir(parents=True, exist_ok=True)
    epochs = max(cfg.epochs for cfg in load_space(space).extreme_configs())
    argv = [sys.executable, "-m", "distcluster.tune", "--space", space, "--samples", str(samples),
            "--search", search, "--set", f"seed={seed}", "--select", "unsupervised",
            "--grace-period", str(epochs),
            "--output", str(folder / "sweep"), "--experiment", "benchmark-selection",
            "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}"]
    subprocess.run(argv, check=True)
    return json.loads((folder / "sweep" / "tune_summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="digits-imc-swav")
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--search", default="random")
    parser.add_argument("--seed", type=int, default=0, help="the trials' seed and the searcher's")
    parser.add_argument("--keep", help="keep the sweep's folder here (default: a temporary one)")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.keep:
        summary = sweep(args.space, args.samples, args.search, args.seed, Path(args.keep))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            summary = sweep(args.space, args.samples, args.search, args.seed, Path(tmp))
    minutes = (time.perf_counter() - started) / 60
    trials = [t for t in summary["trials"] if t["status"] == "completed"]
    keys = list(trials[0]["config"])
    for t in trials:
        t["product"] = t["view_mi"] * t["consensus"]
    lines = ["| trial | " + " | ".join(keys) + " | consensus | view_mi | view_mi x consensus | ACC |",
             "|---" * (len(keys) + 5) + "|"]
    for t in sorted(trials, key=lambda t: -t["consensus"]):
        values = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in t["config"].values()]
        lines.append(f"| {t['trial_id']} | " + " | ".join(values) + f" | {t['consensus']:.4f} | "
                     f"{t['view_mi']:.4f} | {t['product']:.4f} | {t['acc']:.4f} |")
    accs = [t["acc"] for t in trials]
    rho = spearmanr([t["consensus"] for t in trials], accs).statistic
    others = {key: (spearmanr([t[key] for t in trials], accs).statistic,
                    max(trials, key=lambda t: t[key])["acc"]) for key in ("view_mi", "product")}
    picked = summary["best"]["acc"]
    best = max(t["acc"] for t in trials)
    verdict = "met" if rho >= 0.6 and best - picked <= 0.03 else "NOT met"
    body = "\n".join([
        f"## Label-free model selection on digits, seed {args.seed} (issue 6)\n",
        f"Machine: {machine()}. Command: `.venv/bin/python benchmarks/selection.py --space {args.space} "
        f"--samples {args.samples} --search {args.search} --seed {args.seed}` "
        f"({len(trials)} completed trials, "
        f"{minutes:.1f} min, early stopping off so that every trial is scored at its last epoch).\n",
        *lines, "",
        f"Spearman(consensus, ACC) = **{rho:.3f}** (view_mi alone: {others['view_mi'][0]:.3f}, pick ACC "
        f"{others['view_mi'][1]:.4f}; view_mi x consensus: {others['product'][0]:.3f}, pick ACC "
        f"{others['product'][1]:.4f}); "
        f"the label-free pick {summary['best']['trial_id']} has "
        f"ACC **{picked:.4f}**, the best ACC of the sweep is **{best:.4f}** (gap {best - picked:.4f}). "
        f"Target (rho >= 0.6, gap <= 0.03): {verdict}.",
    ])
    print(body)
    write_section(f"selection-seed{args.seed}", body)


if __name__ == "__main__":
    main()

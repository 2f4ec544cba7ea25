"""`python -m distcluster.predict --model URI --data SPEC --out FILE.csv|FILE.parquet`.

One row per image: `index`, `path` (when known), `cluster`, `confidence` (the
probability of that cluster). Batched, on the GPU when present, with a
progress bar; the output is written to a temporary name and renamed.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from distcluster.checkpoint import atomic_file
from distcluster.cli import ArgumentParser, run_command
from distcluster.errors import UserError

if TYPE_CHECKING:
    from distcluster.data import ImageSource
    from distcluster.inference import LoadedModel

PROG = "distcluster.predict"


def build_parser(prog: str = PROG, doc: str = __doc__) -> ArgumentParser:
    p = ArgumentParser(prog=prog, description=doc.splitlines()[0])
    p.add_argument("--model", required=True,
                   help="models:/NAME@ALIAS | models:/NAME/VERSION | runs:/ID/model | DIR")
    p.add_argument("--data", required=True,
                   help="a data SPEC (digits, folder, .zip, .npz, .beton, cifar10:ROOT)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--tracking-uri", default="", help="MLflow URI for models:/ and runs:/ URIs")
    p.add_argument("--gpu", action="store_true", help="require a GPU (default: use one when present)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                   help="a corrupt image in a folder or zip stops predict (fail) or is left out (skip)")
    return p


def run_model(args: argparse.Namespace) -> tuple[LoadedModel, ImageSource, np.ndarray, np.ndarray]:
    """(loaded model, source, clusters, confidence) for --model and --data."""
    from distcluster.inference import assign, load_model
    from distcluster.registry import fetch_model
    from distcluster.sources import open_source, resolve_data

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1 (got {args.batch_size})")
    if args.gpu and not torch.cuda.is_available():
        raise UserError("--gpu: no CUDA GPU is visible to this process")
    folder, scratch = fetch_model(args.model, args.tracking_uri, progress=not args.quiet)
    try:
        loaded = load_model(folder)
    finally:
        if scratch is not None:
            scratch.cleanup()
    source = open_source(resolve_data(args.data, progress=not args.quiet, on_error=args.on_error))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clusters, confidence = assign(loaded, source.batches(args.batch_size), len(source), device,
                                  progress=not args.quiet)
    return loaded, source, clusters, confidence


def write_table(out: Path, columns: dict[str, list]) -> None:
    import pandas as pd

    frame = pd.DataFrame(columns)
    with atomic_file(out) as staging:
        if out.suffix == ".parquet":
            frame.to_parquet(staging, index=False)
        else:
            frame.to_csv(staging, index=False)


def predict(argv: list[str] | None = None) -> Path:
    parser = build_parser()
    parser.add_argument("--out", required=True, help="FILE.csv or FILE.parquet")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.suffix not in (".csv", ".parquet"):
        raise UserError(f"--out must end in .csv or .parquet (got {out})")
    if not out.parent.is_dir():
        raise UserError(f"--out: folder {out.parent} does not exist")
    _, source, clusters, confidence = run_model(args)
    paths = source.paths() or [None] * len(source)
    write_table(out, {"index": list(range(len(source))), "path": paths, "cluster": clusters.tolist(),
                      "confidence": confidence.round(6).tolist()})
    print(f"wrote {len(source)} rows to {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, lambda: predict(argv))


if __name__ == "__main__":
    raise SystemExit(main())

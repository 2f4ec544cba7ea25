"""`python -m distcluster.predict --model URI --data SPEC --out FILE.csv|FILE.parquet|FOLDER`.

One row per image: `index`, `path` (when known), `cluster`, `confidence` (the
probability of that cluster). Batched, on the GPU when present, with a progress
bar; with `--workers N`, on N Ray Data actors (on a Ray cluster under `ray job
submit`). The rows are written as they come, to a temporary name renamed at the
end; a FOLDER gets parquet shards (part-00000.parquet, ...), for inputs too large
for one file.
"""

from __future__ import annotations

from pathlib import Path

from distcluster.commands.cli import model_arguments, run_command
from distcluster.common.errors import UserError
from distcluster.common.files import check_writable_target
from distcluster.inference.batch import TABLE_SUFFIXES, assign_all, open_inputs, table_writer

PROG = "distcluster.predict"


def check_out(out: Path) -> None:
    if out.suffix and out.suffix.lower() not in TABLE_SUFFIXES:
        raise UserError(f"--out must end in .csv or .parquet, or name a new folder (got {out})")
    check_writable_target(out, "--out", "file" if out.suffix else "folder")


def predict(argv: list[str] | None = None) -> Path:
    parser = model_arguments(PROG, __doc__)
    parser.add_argument("--out", required=True,
                        help="FILE.csv, FILE.parquet, or a new FOLDER (parquet shards)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    check_out(out)
    inputs = open_inputs(args)
    with table_writer(out) as write:
        for rows in assign_all(inputs, args):
            write(rows)
    print(f"wrote {len(inputs.source)} rows to {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, lambda: predict(argv))


if __name__ == "__main__":
    raise SystemExit(main())

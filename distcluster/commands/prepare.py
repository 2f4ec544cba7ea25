"""`python -m distcluster.prepare SRC --out FILE.beton`: store an image collection for FFCV.
`python -m distcluster.prepare --verify FILE.beton`: check every byte of one.

SRC: an ImageFolder directory or .zip (class sub-folders are labels, used only
for evaluation; a flat folder is unlabelled), a torchvision CIFAR root (cifar10,
cifar100-20 with the 20 super-classes), a .npz with `x` (N,H,W[,C]) uint8 and
optional `y`, or `digits`. Images are converted to RGB (alpha composited on
white); a collection whose images are all grey is marked one-channel.

Size rule: images that all share one size with no side above --max-resolution
are stored as they are; otherwise each is resized (antialiased bicubic) so
that its shorter side is min(--max-resolution, the median shorter side) and
centre-cropped to a square. With --write-mode auto, images of at most 96x96
pixels are stored raw and larger ones as JPEG (quality 90).

Each image is read for its size from its header, then read and decoded once
by FFCV's writer processes (with --on-error skip, images that only decoding
shows to be corrupt make the file be written a second time without them).
With --ray-decoders N the decoding and resizing run as Ray Data tasks spread
over the nodes of the Ray cluster (every node must see SRC at the same path)
and the images stream, in order, to the writer processes on this machine.

Writes FILE.beton and FILE.beton.json (count, image shape, label names,
whether labels exist, skipped files, source, and the .beton's size, SHA-256
and 4 MiB chunk digests). The .beton is written under a temporary name and
renamed when complete; the JSON is written last. Every open of the .beton
checks its size, its header and 16 of its chunks; --verify checks all of
them, naming the first that changed (exit 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from distcluster.commands.cli import ArgumentParser, run_command
from distcluster.common.errors import UserError
from distcluster.data.images import FORMATS, SPLITS, open_collection

PROG = "distcluster.prepare"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("src", nargs="?", help="folder | FILE.zip | FILE.npz | CIFAR root | digits")
    p.add_argument("--out", help="output FILE.beton (required with SRC)")
    p.add_argument("--verify", metavar="FILE.beton",
                   help="instead of preparing: check every chunk of FILE.beton against its .json")
    p.add_argument("--format", default="auto", choices=FORMATS)
    p.add_argument("--split", default="train", choices=SPLITS, help="CIFAR formats: which batches")
    p.add_argument("--on-error", default="fail", choices=("fail", "skip"),
                   help="a corrupt image stops the run (fail) or is left out and listed (skip)")
    p.add_argument("--max-resolution", type=int, default=256, help="largest stored side (see size rule)")
    p.add_argument("--write-mode", default="auto", choices=("auto", "raw", "jpg"),
                   help="auto: raw up to 96x96 pixels, JPEG (quality 90) above")
    p.add_argument("--workers", type=int, default=0, help="writer processes (default: CPU count, <= 8)")
    p.add_argument("--ray-decoders", type=int, default=0, metavar="N",
                   help="decode and resize on N Ray Data tasks at once, spread over the Ray cluster "
                        "(RAY_ADDRESS, else a local one), streamed in order to this machine's writer "
                        "processes; 0 (default): the writer processes decode")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def prepare(argv: list[str] | None = None) -> dict | None:
    args = build_parser().parse_args(argv)
    if args.verify is not None:
        return verify(args)
    if args.src is None or args.out is None:
        raise UserError("the following arguments are required: " + ", ".join(
            name for name, value in (("src", args.src), ("--out", args.out)) if value is None))
    out = Path(args.out)
    if out.suffix != ".beton":
        raise UserError(f"--out must end in .beton (got {out})")
    if out.exists() and not out.is_file():
        raise UserError(f"--out {out} exists and is not a file")
    if args.max_resolution < 2:
        raise UserError(f"--max-resolution must be >= 2 (got {args.max_resolution})")
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0 (0 = CPU count, at most 8), got {args.workers}")
    if args.ray_decoders < 0:
        raise UserError(f"--ray-decoders must be >= 0 (0 = no Ray), got {args.ray_decoders}")
    from distcluster.data.beton_writer import write_beton

    collection = open_collection(args.src, args.format, args.split)
    nodes: Counter = Counter()
    decoder = None
    if args.ray_decoders:
        from distcluster.cluster.ray_data import decoded_on_cluster

        decoder = decoded_on_cluster(args.ray_decoders, nodes)
    metadata = write_beton(collection, out, args.max_resolution, args.on_error, args.workers,
                           progress=not args.quiet, write_mode=args.write_mode, decoder=decoder)
    print(json.dumps({k: metadata[k] for k in ("count", "image_shape", "channels", "labelled",
                                               "num_classes", "skipped_count")}))
    if nodes and not args.quiet:  # status on stderr: stdout is the JSON alone
        print(f"decoded on {len(nodes)} Ray node(s): " + ", ".join(
            f"{node[:8]} {count}" for node, count in nodes.most_common()) + " images", file=sys.stderr)
    print(f"wrote {out} and {out.name}.json", file=sys.stderr)
    return metadata


def verify(args: argparse.Namespace) -> None:
    """--verify FILE.beton: one line, exit 0 when every chunk is as written, else exit 2."""
    if args.src is not None or args.out is not None:
        raise UserError("--verify FILE.beton checks a prepared file: give no SRC or --out with it")
    beton = Path(args.verify)
    if beton.suffix != ".beton":
        raise UserError(f"--verify takes a FILE.beton (got {beton})")
    from distcluster.data.ffcv_io import verify_beton

    print(verify_beton(beton, progress=not args.quiet))


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, lambda: prepare(argv))


if __name__ == "__main__":
    raise SystemExit(main())

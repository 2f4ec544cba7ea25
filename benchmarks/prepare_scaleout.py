"""Prepare on one machine against prepare with the decoding spread over Ray nodes.

    .venv/bin/python benchmarks/prepare_scaleout.py [--images 1500] [--side 500] [--folder /tmp/dc-prep]

Writes a pile of photo-sized JPEGs (SIDE x 3/4 SIDE, smooth colour fields under noise, quality
90, 10 class folders), then measures, per image:

- decode: reading, decoding and fitting one image (prepare's size rule, --max-resolution 256) on
  one core, in this process: the work `--ray-decoders` moves to other nodes;
- writer: the writer's side alone (header scan, JPEG encoding and writing by 2 writer processes),
  fed images already decoded, through the same streamed path: what stays on the writing machine;
- local: `distcluster.prepare --workers 2`, the user's command on one machine;
- ray: `distcluster.prepare --workers 2 --ray-decoders 2` with RAY_ADDRESS set to a Ray cluster
  of two one-CPU nodes on this machine (both share its 2 cores: this shows the overhead of the
  path, not a speed-up).

From `decode` and `writer` it estimates the speed-up on real nodes: one machine of c cores
prepares at c / (decode + writer_core) images a second (writer_core = 2 x writer, the writer's
cost on one core); with n decoding nodes of c cores and a writer of c cores, at
min(n c / decode, c / writer_core). Prints a table and updates `prepare-scaleout` in RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from common import machine, write_section  # noqa: E402
from servers import ray_head, start_ray_node, stop_ray_node  # noqa: E402

from distcluster.data.beton_writer import FitRange, Layout, scan, write_beton  # noqa: E402
from distcluster.data.images import open_collection  # noqa: E402

RESOLUTION = 256


def photo_pile(folder: Path, count: int, side: int) -> None:
    rng = np.random.default_rng(0)
    height = side * 3 // 4
    ramp_y, ramp_x = np.linspace(0, 1, height)[:, None, None], np.linspace(0, 1, side)[None, :, None]
    for index in range(count):
        colours = rng.uniform(0, 255, (2, 3))
        field = ramp_y * colours[0] + ramp_x * colours[1] * (1 - ramp_y)
        pixels = np.clip(field + rng.normal(0, 12, (height, side, 3)), 0, 255).astype(np.uint8)
        target = folder / f"class{index % 10}"
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(target / f"{index:06d}.jpg", quality=90)


def decode_seconds(pile: Path, sample: int = 200) -> float:
    """Read, decode and fit `sample` images on one core, in this process, per image."""
    import torch

    torch.set_num_threads(1)
    collection = open_collection(str(pile))
    found = scan(collection, "fail", progress=False)
    fit = FitRange(collection, found.good, Layout.of(found.sizes, RESOLUTION, "auto"))
    started = time.perf_counter()
    fit(0, sample)
    return (time.perf_counter() - started) / sample


def writer_seconds(pile: Path, out: Path) -> float:
    """The writer's side alone: images decoded beforehand, streamed to 2 writer processes."""
    collection = open_collection(str(pile))
    found = scan(collection, "fail", progress=False)
    columns = FitRange(collection, found.good, Layout.of(found.sizes, RESOLUTION, "auto"))(0, len(found.good))

    def decoded(fit, count):
        for start in range(0, count, 256):
            yield {key: value[start:start + 256] for key, value in columns.items()}

    started = time.perf_counter()
    write_beton(collection, out, RESOLUTION, workers=2, progress=False, decoder=decoded)
    return (time.perf_counter() - started) / len(found.good)


def command_seconds(pile: Path, out: Path, *flags: str, env: dict[str, str] | None = None) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "distcluster.prepare", str(pile), "--out", str(out), "--quiet",
                    "--workers", "2", "--max-resolution", str(RESOLUTION), *flags], check=True,
                   env={**os.environ, **(env or {})}, capture_output=True)
    return time.perf_counter() - started


def ray_seconds(pile: Path, out: Path) -> float:
    with ray_head(cpus=1) as head:
        node = start_ray_node(head, cpus=1)
        try:
            return command_seconds(pile, out, "--ray-decoders", "2", env=head.env)
        finally:
            stop_ray_node(node)


def estimate(decode: float, writer_core: float, nodes: int, cores: int) -> float:
    """Images a second with `nodes` decoding nodes of `cores` cores and a writer of `cores`."""
    return min(nodes * cores / decode, cores / writer_core)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--side", type=int, default=500)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/dc-prep"))
    args = parser.parse_args()
    shutil.rmtree(args.folder, ignore_errors=True)
    pile = args.folder / "photos"
    photo_pile(pile, args.images, args.side)
    try:
        decode = decode_seconds(pile)
        writer = writer_seconds(pile, args.folder / "writer.beton")
        local = command_seconds(pile, args.folder / "local.beton") / args.images
        ray = ray_seconds(pile, args.folder / "ray.beton") / args.images
    finally:
        shutil.rmtree(args.folder, ignore_errors=True)
    writer_core = 2 * writer
    one_machine = 32 / (decode + writer_core)
    rows = [f"| {n} | {estimate(decode, writer_core, n, 32):,.0f} | "
            f"{estimate(decode, writer_core, n, 32) / one_machine:.1f}x |" for n in (1, 4, 16)]
    body = "\n".join([
        "## Prepare: decoding spread over Ray nodes (issue 33)", "",
        f"Machine: {machine()}. {args.images} JPEGs of {args.side}x{args.side * 3 // 4} (quality 90) "
        f"prepared at --max-resolution {RESOLUTION} (stored as JPEG).", "",
        f"    .venv/bin/python benchmarks/prepare_scaleout.py --images {args.images} --side {args.side}", "",
        "| measured | ms an image |", "|---|---|",
        f"| decode and fit, one core | {1e3 * decode:.2f} |",
        f"| the writer's side alone (scan, encode, write), 2 processes | {1e3 * writer:.2f} |",
        f"| `prepare --workers 2` (one machine, 2 cores) | {1e3 * local:.2f} |",
        f"| `prepare --workers 2 --ray-decoders 2`, 2 one-CPU Ray nodes sharing these 2 cores | "
        f"{1e3 * ray:.2f} |", "",
        f"Estimated from the measured costs (not measured): one 32-core machine prepares "
        f"{one_machine:,.0f} images a second; with the decoding on n nodes of 32 cores and the "
        "writer on one more:", "",
        "| decoding nodes | images a second | speed-up |", "|---|---|---|", *rows])
    print(body)
    write_section("prepare-scaleout", body)


if __name__ == "__main__":
    main()

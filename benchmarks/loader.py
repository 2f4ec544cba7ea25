"""Images/s of distcluster's FFCV loader vs torchvision ImageFolder + DataLoader on CIFAR-10 JPEGs.

    .venv/bin/python benchmarks/loader.py [--zip ../shared/data/cifar10-train-jpg.zip] [--limit N]

Both sides produce the same thing: shuffled uint8 batches (256, 3, 32, 32) of
every image once per epoch, on the same cores (2 loader workers / threads).
The .beton files are made once with `distcluster.prepare` (raw and JPEG
storage); preparing is not timed. Each loader runs a warm-up epoch (FFCV
compiles its pipeline, the page cache fills), then `--epochs` timed epochs.
Prints a table and updates the `loader` section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_section  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-train-jpg.zip"
BATCH = 256


def extract(archive: Path, folder: Path, limit: int) -> Path:
    with zipfile.ZipFile(archive) as z:
        names = sorted(n for n in z.namelist() if n.lower().endswith(".jpg"))
        if limit:
            names = names[:: max(1, len(names) // limit)][:limit]
        for name in names:
            z.extract(name, folder)
    roots = [p for p in folder.iterdir() if p.is_dir()]
    return roots[0] if len(roots) == 1 else folder


def torchvision_epoch_loader(root: Path, workers: int):
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import PILToTensor

    dataset = ImageFolder(str(root), transform=PILToTensor())
    return torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers,
                                       drop_last=True, persistent_workers=True)


def ffcv_epoch_loader(beton: Path, workers: int):
    from ffcv.fields.decoders import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor, ToTorchImage

    return Loader(str(beton), batch_size=BATCH, num_workers=workers, order=OrderOption.RANDOM,
                  drop_last=True, seed=0, pipelines={"image": [SimpleRGBImageDecoder(), ToTensor(),
                                                               ToTorchImage()], "label": None})


def images_per_second(loader, epochs: int) -> float:
    checksum = 0
    for batch in loader:  # warm-up epoch
        checksum += int(batch[0][0, 0, 0, 0])
    started, count = time.perf_counter(), 0
    for _ in range(epochs):
        for batch in loader:
            images = batch[0]
            assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
            count += images.shape[0]
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zip", type=Path, default=SHARED)
    parser.add_argument("--limit", type=int, default=0, help="use N images (default: all)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = extract(args.zip, Path(tmp) / "jpg", args.limit)
        count = sum(1 for _ in folder.rglob("*.jpg"))
        for mode in ("raw", "jpg"):
            subprocess.run([sys.executable, "-m", "distcluster.prepare", str(folder), "--out",
                            f"{tmp}/{mode}.beton", "--write-mode", mode, "--quiet"], check=True)
        torch.set_num_threads(1)
        baseline = images_per_second(torchvision_epoch_loader(folder, args.workers), args.epochs)
        rows.append(("torchvision ImageFolder + DataLoader (JPEG files)", baseline))
        for mode in ("raw", "jpg"):
            speed = images_per_second(ffcv_epoch_loader(Path(tmp) / f"{mode}.beton", args.workers),
                                      args.epochs)
            rows.append((f"FFCV Loader, .beton stored {mode}", speed))
    limit = f" --limit {args.limit}" if args.limit else ""
    lines = [f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}.",
             f"Command: `.venv/bin/python benchmarks/loader.py{limit}`"
             f" ({count} CIFAR-10 JPEGs, batch {BATCH}, {args.workers} workers/threads, "
             f"mean of {args.epochs} epochs after a warm-up epoch).", "",
             "| loader | images/s | vs torchvision |", "|---|---|---|"]
    lines += [f"| {name} | {speed:,.0f} | {speed / baseline:.1f}x |" for name, speed in rows]
    table = "\n".join(lines)
    print(table)
    write_section("loader", "## Data loading: FFCV vs torchvision (issue 3)\n\n" + table)


if __name__ == "__main__":
    main()

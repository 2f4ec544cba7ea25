"""Multi-crop images/s: distcluster's batched augmentation vs kornia doing the same work.

    .venv/bin/python benchmarks/augment.py [--device cpu|cuda] [--iterations N]

Work per batch of 256 uint8 32x32 RGB images: 2 crops of 28 px (scale 0.2-1)
and 4 of 18 px (scale 0.08-0.4), each with its own resized crop, horizontal
flip (p 0.5), colour jitter (0.4, 0.4, 0.4, 0.1, p 0.8), greyscale (p 0.2),
Gaussian blur (sigma 0.1-2 px, p 0.5) and solarize (p 0.2), then normalisation.
kornia (pip install kornia) runs its AugmentationSequential with the same
parameters, per sample, on the same device. Needs the `bench` extra.
Prints a table and updates the `augment-<device>` section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_section  # noqa: E402

from distcluster.data.augment import (  # noqa: E402
    AugmentConfig,
    CropGroup,
    MultiCrop,  # noqa: E402
)

BATCH, SIZE = 256, 32
GROUPS = [CropGroup(2, 28, (0.2, 1.0)), CropGroup(4, 18, (0.08, 0.4))]
JITTER, JITTER_P, GREY_P = (0.4, 0.4, 0.4, 0.1), 0.8, 0.2
BLUR_P, BLUR_SIGMA, SOLARIZE_P = 0.5, (0.1, 2.0), 0.2
MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]


def distcluster_augment(device: torch.device):
    aug = AugmentConfig(crops=GROUPS, flip=0.5, jitter=JITTER, jitter_p=JITTER_P, grey_p=GREY_P,
                        blur_p=BLUR_P, blur_sigma=BLUR_SIGMA, solarize_p=SOLARIZE_P)
    crop = MultiCrop(aug, MEAN, STD)
    gen = torch.Generator().manual_seed(0)
    return lambda images: crop(images, gen)


def kornia_augment(device: torch.device):
    import kornia.augmentation as K

    def pipeline(group: CropGroup):
        return K.AugmentationSequential(
            K.RandomResizedCrop((group.size, group.size), scale=group.scale, ratio=group.ratio),
            K.RandomHorizontalFlip(p=0.5),
            K.ColorJitter(*JITTER, p=JITTER_P),
            K.RandomGrayscale(p=GREY_P),
            K.RandomGaussianBlur((13, 13), BLUR_SIGMA, p=BLUR_P),  # radius 3 * max sigma, as ours
            K.RandomSolarize(thresholds=0.0, additions=0.0, p=SOLARIZE_P),
            K.Normalize(torch.tensor(MEAN), torch.tensor(STD)),
        ).to(device)

    pipelines = [(group, pipeline(group)) for group in GROUPS]

    def run(images: torch.Tensor) -> list[torch.Tensor]:
        x = images.float().div(255)
        return [torch.cat([p(x) for _ in range(group.count)]) for group, p in pipelines]

    return run


def images_per_second(augment, images: torch.Tensor, iterations: int) -> float:
    def sync():
        if images.device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):  # warm-up
        augment(images)
    sync()
    started = time.perf_counter()
    for _ in range(iterations):
        out = augment(images)
    sync()
    assert [o.shape for o in out] == [(2 * BATCH, 3, 28, 28), (4 * BATCH, 3, 18, 18)]
    return iterations * BATCH / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    images = torch.randint(0, 256, (BATCH, 3, SIZE, SIZE), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0)).to(device)
    rows = [(name, images_per_second(make(device), images, args.iterations))
            for name, make in [("distcluster MultiCrop", distcluster_augment),
                               ("kornia AugmentationSequential", kornia_augment)]]
    baseline = rows[1][1]
    lines = [f"Machine: {machine()}; device {device}, {torch.get_num_threads()} threads. "
             f"Date: {time.strftime('%Y-%m-%d')}.",
             f"Command: `.venv/bin/python benchmarks/augment.py --device {args.device}` "
             f"(2x28 px + 4x18 px crops from 32 px, batch {BATCH}, {args.iterations} batches after 3 "
             "warm-up; flip, jitter, greyscale, blur, solarize, normalise).", "",
             "| augmentation | source images/s | crops/s | vs kornia |", "|---|---|---|---|"]
    lines += [f"| {name} | {speed:,.0f} | {6 * speed:,.0f} | {speed / baseline:.1f}x |"
              for name, speed in rows]
    table = "\n".join(lines)
    print(table)
    title = f"## Multi-crop augmentation on {device.type} (issue 3)"
    write_section(f"augment-{device.type}", f"{title}\n\n{table}")


if __name__ == "__main__":
    main()

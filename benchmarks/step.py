"""Training-step throughput per recipe and batch size, with achieved TFLOP/s.

    .venv/bin/python benchmarks/step.py [--device cuda|cpu] [--recipes cifar10-imc-swav ...]
        [--batches 256 512] [--steps 20] [--set KEY=VALUE ...]

One process, random uint8 images of the recipe's input size already on the
device (so that the data path is not measured), the recipe's multi-crop
augmentation, objective and optimiser, with the speed switches as configured
(`--set speed.compile=false` etc. to compare). Times `--steps` full training
steps after warm-up, and separately the backbone alone (forward + backward of
every crop group under the same autocast), the part that can approach the
device's peak. FLOPs are counted once with torch.utils.flop_counter on the eager
model. Peak: dense bf16 of the GPU model when known (H100/H200 SXM 989 TFLOP/s,
A100 312). Prints a table and updates the `step-<device>` section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_section  # noqa: E402

from distcluster import config
from distcluster.data.augment import MultiCrop  # noqa: E402
from distcluster.engine.build import WorkerContext, build_training_state, set_cpu_speedups  # noqa: E402
from distcluster.engine.step import autocast_for, train_step  # noqa: E402

# Dense bf16 datasheet peaks; the first name found in the device's name wins.
PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16.items() if key in name), None)


def input_shape(recipe: str) -> tuple[int, int]:
    """(channels, size) of the images a recipe is written for."""
    if recipe.startswith("digits"):
        return 1, 8
    return 3, 96 if recipe.startswith("stl10") else 32


class Bench:
    """A model, optimiser and augmentation for one recipe at one batch size, on `device`."""

    def __init__(self, recipe: str, batch: int, device: torch.device, overrides: list[str],
                 compile_ok: bool = True):
        values = {**config.load_recipe(recipe), "batch_size": batch, "workers": 0,
                  "gpu": device.type == "cuda"}
        for override in overrides + ([] if compile_ok else ["speed.compile=false"]):
            values = config.apply_override(values, override)
        self.cfg = config.from_dict(values).validate()
        channels, size = input_shape(recipe)
        self.device, self.batch = device, batch
        self.state = build_training_state(self.cfg, channels, WorkerContext(device=device))
        self.augment = MultiCrop(self.cfg.augment, [0.5] * channels, [0.25] * channels)
        gen = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (batch, channels, size, size), generator=gen,
                                    dtype=torch.uint8).to(device)
        self.gen = gen

    def crops(self) -> list[torch.Tensor]:
        crops = self.augment(self.images, self.gen)
        if self.state.speed.channels_last:
            crops = [c.contiguous(memory_format=torch.channels_last) for c in crops]
        return crops

    def step(self) -> None:
        train_step(self.state, self.crops(), self.batch)

    def backbone_step(self, crops: list[torch.Tensor]) -> None:
        backbone = self.state.model.backbone
        with autocast_for(self.cfg, self.device):
            total = sum(backbone(group).float().sum() for group in crops)
        total.backward()


def timed(fn, steps: int, device: torch.device) -> float:
    """Seconds per call after 3 warm-up calls."""
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / steps


def counted(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def measure(recipe: str, batch: int, device: torch.device, steps: int, overrides: list[str]) -> dict:
    eager = Bench(recipe, batch, device, overrides, compile_ok=False)
    crops = eager.crops()
    step_flops, backbone_flops = counted(eager.step), counted(lambda: eager.backbone_step(crops))
    bench = Bench(recipe, batch, device, overrides)
    crops = bench.crops()
    step_s = timed(bench.step, steps, device)
    backbone_s = timed(lambda: bench.backbone_step(crops), steps, device)
    return {"recipe": recipe, "batch": batch, "crops": sum(len(c) for c in crops) // batch,
            "step_s": step_s, "backbone_s": backbone_s, "step_flops": step_flops,
            "backbone_flops": backbone_flops, "speed": bench.state.speed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--recipes", nargs="+", default=["cifar10-imc-swav", "cifar10-iic", "cifar10-crlc"])
    parser.add_argument("--batches", nargs="+", type=int, default=[256, 512])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    args = parser.parse_args()
    set_cpu_speedups()
    device = torch.device(args.device)
    peak = peak_flops(device)
    rows = []
    for recipe in args.recipes:
        for batch in args.batches:
            rows.append(measure(recipe, batch, device, args.steps, args.overrides))
            r = rows[-1]
            print(f"{recipe} batch {batch}: {batch / r['step_s']:,.0f} images/s", flush=True)
    speed = rows[0]["speed"]
    lines = [f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}. Device {device}; speed switches: "
             f"channels_last {speed.channels_last}, compile {speed.compile}, fused optimiser "
             f"{speed.fused_optimizer}, loss check every {speed.check_every} steps; bf16 autocast.",
             f"Command: `.venv/bin/python benchmarks/step.py --device {args.device} --recipes "
             f"{' '.join(args.recipes)} --batches {' '.join(map(str, args.batches))} --steps {args.steps}"
             + "".join(f" --set {o}" for o in args.overrides) + "` (augmentation + forward + loss + backward "
             "+ optimiser on images already on the device; backbone = forward + backward of the crops).", "",
             "| recipe | batch | crops/image | images/s | crops/s | step ms | step TFLOP/s "
             "| backbone TFLOP/s | backbone % of bf16 peak |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        backbone_rate = r["backbone_flops"] / r["backbone_s"]
        share = f"{backbone_rate / peak:.1%}" if peak else "n/a (no known peak)"
        lines.append(f"| {r['recipe']} | {r['batch']} | {r['crops']} | {r['batch'] / r['step_s']:,.0f} | "
                     f"{r['batch'] * r['crops'] / r['step_s']:,.0f} | {r['step_s'] * 1000:.1f} | "
                     f"{r['step_flops'] / r['step_s'] / 1e12:.3f} | {backbone_rate / 1e12:.3f} | {share} |")
    table = "\n".join(lines)
    print(table)
    title = f"## Training step throughput on {device.type} (issue 7)"
    write_section(f"step-{device.type}", f"{title}\n\n{table}")


if __name__ == "__main__":
    main()

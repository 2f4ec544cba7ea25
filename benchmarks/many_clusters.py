"""Step time, bytes exchanged per step and peak memory as the number of clusters grows.

    .venv/bin/python benchmarks/many_clusters.py [--clusters 10 100 1000] [--steps 8]
        [--recipes cifar10-cpu cifar10-cpu-imc-swav] [--eval-images 8192]

Two gloo processes on this machine (a 2-worker run), each holding half of the recipe's global
batch of random 32x32 RGB images, the recipe's multi-crop augmentation, objective and optimiser,
with `clusters` K (IMC-SwAV's prototypes: the recipe's, or K when larger). After 2 warm-up steps
it times `--steps` training steps (median) and counts the bytes each rank hands to
torch.distributed collectives during them (the objective's all-reduces and gathers, the loss
guard), plus DDP's gradient all-reduce (the bytes of every trained parameter, which DDP's C++
reducer sends without passing through Python). Then one shared evaluation of `--eval-images`
images (every rank its share, rank 0 gathering the assignments). Peak RSS is each rank's
high-water mark (ru_maxrss), the process's torch and Python included. Prints a table and
updates the `many-clusters-cpu` section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import faulthandler
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from common import machine, write_section  # noqa: E402

COUNTED = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor")


class ByteCounter:
    """Wraps torch.distributed's collectives to add up the bytes of the tensors handed to them."""

    def __init__(self) -> None:
        self.bytes = 0
        for name in COUNTED:
            original = getattr(torch_dist, name)
            setattr(torch_dist, name, self._counting(original))

    def _counting(self, original):
        def collective(tensor, *args, **kwargs):
            if isinstance(tensor, torch.Tensor):  # all_gather(list, tensor) counts the tensor sent
                self.bytes += tensor.numel() * tensor.element_size()
            elif args and isinstance(args[0], torch.Tensor):
                self.bytes += args[0].numel() * args[0].element_size()
            return original(tensor, *args, **kwargs)

        return collective


def trial_config(recipe: str, clusters: int):
    from distcluster import config

    values = {**config.load_recipe(recipe), "clusters": clusters, "precision": "fp32"}
    if values["objective"] == "imc_swav":
        prototypes = max(values["imc_swav"]["prototypes"], clusters)
        values["imc_swav"] = {**values["imc_swav"], "prototypes": prototypes}
    return config.from_dict(values)


def _rank(rank: int, init: str, recipe: str, clusters: int, steps: int, eval_images: int, out: str) -> None:
    from distcluster.data.arrays import ArraySource
    from distcluster.data.augment import MultiCrop
    from distcluster.engine.build import WorkerContext, build_training_state, set_cpu_speedups
    from distcluster.engine.evaluation import assign_shared
    from distcluster.engine.step import train_step

    faulthandler.enable()  # a crash of the rank says where
    torch.set_num_threads(1)
    set_cpu_speedups()
    torch_dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        cfg = trial_config(recipe, clusters)
        counter = ByteCounter()
        state = build_training_state(cfg, 3, WorkerContext(rank, 2, torch.device("cpu")))
        local = cfg.batch_size // 2
        gen = torch.Generator().manual_seed(rank)
        images = torch.randint(0, 256, (local, 3, 32, 32), dtype=torch.uint8, generator=gen)
        augment = MultiCrop(cfg.augment, [0.5] * 3, [0.25] * 3)
        times = []
        for step in range(steps + 2):
            crops = augment(images, gen)
            counter.bytes = 0 if step == 2 else counter.bytes
            started = time.perf_counter()
            train_step(state, crops, local)
            times.append(time.perf_counter() - started)
        objective_bytes = counter.bytes / steps
        ddp_bytes = sum(p.numel() * p.element_size() for p in state.model.parameters() if p.requires_grad)
        pile = torch.randint(0, 256, (eval_images, 3, 32, 32), dtype=torch.uint8)
        source = ArraySource(pile, None, "random")
        started = time.perf_counter()
        assign_shared(state.model, source, augment, torch.device("cpu"), 0)
        eval_seconds = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (ru_maxrss in KiB)
        torch.save({"step": statistics.median(times[2:]), "objective_bytes": objective_bytes,
                    "ddp_bytes": ddp_bytes, "eval_seconds": eval_seconds, "peak_gib": peak,
                    "batch": cfg.batch_size}, Path(out) / f"rank{rank}.pt")
        torch_dist.barrier()  # neither rank tears the group down while the other still uses it
    finally:
        torch_dist.destroy_process_group()


def measure(recipe: str, clusters: int, steps: int, eval_images: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_rank, args=(f"{folder}/init", recipe, clusters, steps, eval_images, folder), nprocs=2)
        ranks = [torch.load(Path(folder) / f"rank{r}.pt") for r in range(2)]
    return {"step": max(r["step"] for r in ranks), "objective_bytes": ranks[0]["objective_bytes"],
            "ddp_bytes": ranks[0]["ddp_bytes"], "eval_seconds": max(r["eval_seconds"] for r in ranks),
            "peak_gib": max(r["peak_gib"] for r in ranks), "batch": ranks[0]["batch"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clusters", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--recipes", nargs="+", default=["cifar10-cpu", "cifar10-cpu-imc-swav"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--eval-images", type=int, default=8192)
    args = parser.parse_args()
    rows = ["| recipe | K | global batch | step (s) | objective collectives per step (MB) | DDP gradients "
            "per step (MB) | evaluation of N images (s) | peak RSS per rank (GiB) |",
            "|---|---|---|---|---|---|---|---|"]
    for recipe in args.recipes:
        for k in args.clusters:
            m = measure(recipe, k, args.steps, args.eval_images)
            rows.append(f"| {recipe} | {k} | {m['batch']} | {m['step']:.3f} | "
                        f"{m['objective_bytes'] / 1e6:.2f} | {m['ddp_bytes'] / 1e6:.2f} | "
                        f"{m['eval_seconds']:.1f} | {m['peak_gib']:.2f} |")
            print(rows[-1], flush=True)
    body = "\n".join([
        "## Many clusters: step time, bytes per step, memory (issue 33)", "",
        f"Machine: {machine()}. Two gloo processes (1 thread each), fp32, random 32x32 images; "
        f"{args.steps} timed steps after 2 warm-up, N = {args.eval_images}. "
        "Bytes are what each rank hands to a collective per step.", "",
        f"    .venv/bin/python benchmarks/many_clusters.py --clusters {' '.join(map(str, args.clusters))} "
        f"--recipes {' '.join(args.recipes)} --steps {args.steps} --eval-images {args.eval_images}", "",
        *rows])
    print(body)
    write_section("many-clusters-cpu", body)


if __name__ == "__main__":
    main()

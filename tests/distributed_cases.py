"""Objective computations run both in one process on the whole batch and on a
2-process gloo group with half the batch per rank (see test_distributed.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from distcluster import config
from distcluster.core.distributed import global_batchnorm
from distcluster.core.objectives import CRLC, IIC, IMCSwAV, iic_loss, sinkhorn
from distcluster.engine.build import WorkerContext, build_training_state
from distcluster.engine.step import train_step

BATCH, FEATURES, CLUSTERS, VIEWS = 16, 12, 4, 4
CPU = torch.device("cpu")


def _objectives() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    objectives = {
        "iic": IIC(FEATURES, CLUSTERS, overclusters=7, subheads=3, lamb=1.2),
        "imc_swav": IMCSwAV(FEATURES, CLUSTERS, prototypes=16, projection_hidden=32, projection_dim=8,
                            classifier_hidden=32, freeze_prototypes_steps=0),
        "crlc": CRLC(FEATURES, CLUSTERS, subheads=3, hidden=32, projection_dim=8),
        # many clusters and prototypes: every rank gathers the probabilities, not the joints
        "imc_swav_gathered": IMCSwAV(FEATURES, 16, prototypes=64, projection_hidden=32, projection_dim=8,
                                     classifier_hidden=32, freeze_prototypes_steps=0),
        # the estimated prior, with unequal target sizes (a buffer)
        "iic_estimated": IIC(FEATURES, CLUSTERS, overclusters=7, subheads=3, lamb=1.2, prior="estimated"),
        "imc_swav_estimated": IMCSwAV(FEATURES, CLUSTERS, prototypes=16, projection_hidden=32,
                                      projection_dim=8, classifier_hidden=32, freeze_prototypes_steps=0,
                                      prior="estimated"),
        "crlc_estimated": CRLC(FEATURES, CLUSTERS, subheads=3, hidden=32, projection_dim=8,
                               prior="estimated"),
    }
    for name, objective in objectives.items():
        if name.endswith("_estimated"):
            objective.prior.target.copy_(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    return objectives


def _average_like_ddp(grads: dict[str, torch.Tensor], world: int) -> dict[str, torch.Tensor]:
    if world > 1:
        for g in grads.values():
            dist.all_reduce(g)
            g /= world
    return grads


def run_cases(rank: int, world: int) -> dict[str, dict[str, torch.Tensor]]:
    """Losses, gradients (averaged over ranks as DDP does) and codes for this rank's share."""
    local = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    gen = torch.Generator().manual_seed(1)
    features = [torch.randn(BATCH, FEATURES, generator=gen) for _ in range(VIEWS)]
    results: dict[str, dict[str, torch.Tensor]] = {}
    for name, objective in _objectives().items():
        # eval: BatchNorm uses its running statistics; train: the global batch's (GlobalBatchNorm)
        results[name] = _objective_case(objective.eval(), features, local, world)
        trained = global_batchnorm(objective).train()
        results[f"{name}_train"] = _objective_case(trained, features, local, world)

    logits = torch.randn(BATCH, CLUSTERS, generator=gen, requires_grad=True)
    other = torch.randn(BATCH, CLUSTERS, generator=gen)
    loss = iic_loss(logits[local].softmax(-1), other[local].softmax(-1), lamb=1.0)
    loss.backward()
    results["iic_loss"] = {"loss": loss.detach(), **_average_like_ddp({"x": logits.grad}, world)}

    scores = torch.randn(BATCH, 10, generator=gen)
    results["sinkhorn"] = {  # gathered whole, and reduced at every iteration
        "codes": sinkhorn(scores[local], epsilon=0.05, iterations=3),
        "codes_reduced": sinkhorn(scores[local], epsilon=0.05, iterations=3, gather_limit=0)}
    queued = torch.randn(2, 24, 10, generator=gen)  # the same on every rank, as IMC-SwAV's queue
    stacked = torch.stack([scores, scores.flip(0)])
    results["sinkhorn_queued"] = {
        "codes": sinkhorn(stacked[:, local], epsilon=0.05, iterations=3, queued=queued),
        "codes_reduced": sinkhorn(stacked[:, local], epsilon=0.05, iterations=3, gather_limit=0,
                                  queued=queued)}
    results["sinkhorn_relaxed"] = {
        "codes": sinkhorn(stacked[:, local], epsilon=0.05, iterations=3, queued=queued, relaxation=0.5),
        "codes_reduced": sinkhorn(stacked[:, local], epsilon=0.05, iterations=3, gather_limit=0,
                                  queued=queued, relaxation=0.5)}
    for mode, speed in SKIP_MODES.items():
        results[mode] = skipped_step_case(rank, world, speed)
    results["training_global_bn"] = training_case(rank, world, sync_batchnorm=True)
    results["training_worker_bn"] = training_case(rank, world, sync_batchnorm=False)
    return results


def _objective_case(objective: nn.Module, features: list[torch.Tensor], local: slice,
                    world: int) -> dict[str, torch.Tensor]:
    """Loss (averaged over ranks), gradients (averaged as DDP does) and BatchNorm running
    statistics after one forward of this rank's share."""
    objective.zero_grad(set_to_none=True)
    result = objective.loss([f[local] for f in features])
    result.loss.backward()
    loss = result.loss.detach().clone()
    if world > 1:
        dist.all_reduce(loss)
        loss /= world
    grads = {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}
    stats = {n: b.clone() for n, b in objective.named_buffers() if "running" in n or "target" in n}
    return {"loss": loss, **_average_like_ddp(grads, world), **stats}


def training_case(rank: int, world: int, sync_batchnorm: bool,
                  device: torch.device = CPU) -> dict[str, torch.Tensor]:
    """Weights and BatchNorm statistics (on the CPU) after three whole training steps (small CNN
    with BatchNorm in train mode, IMC-SwAV, SGD) on this rank's share of one global batch."""
    cfg = config.from_dict({**config.load_recipe("digits-imc-swav"), "precision": "fp32",
                            "model": {"backbone": "small_cnn", "width": 8, "sync_batchnorm": sync_batchnorm},
                            "optim": {"name": "sgd", "lr": 0.05},
                            "imc_swav": {"prototypes": 16, "projection_hidden": 16, "projection_dim": 8,
                                         "classifier_hidden": 16, "freeze_prototypes_steps": 0},
                            "speed": {"channels_last": False, "compile": False}})
    gen = torch.Generator().manual_seed(7)
    local = BATCH // world
    crops = []
    for group in cfg.augment.crops:  # crop-major rows: crop c of every image, then crop c + 1
        everyone = torch.randn(group.count, BATCH, 1, group.size, group.size, generator=gen)
        crops.append(everyone[:, rank * local:(rank + 1) * local].flatten(0, 1))
    state = build_training_state(cfg, 1, WorkerContext(rank, world, device))
    for _ in range(3):
        train_step(state, [c.to(device) for c in crops], local)
    model = state.model
    stats = {n: b.detach().cpu() for n, b in model.named_buffers() if "running" in n}
    return {"weights": nn.utils.parameters_to_vector(model.parameters()).detach().cpu(), **stats}


SKIP_MODES = {  # the host skips the update / the fused optimiser skips it on the device
    "skip_on_host": {"fused_optimizer": False, "check_every": 1},
    "skip_on_device": {"fused_optimizer": True, "check_every": 4},
}


def skipped_step_case(rank: int, world: int, speed: dict) -> dict[str, torch.Tensor]:
    """Three DDP training steps with only the last rank's loss made NaN at step 1, and two
    clean steps from the same start: the finite flags and final weights of both."""
    speed = {"channels_last": False, "compile": False, **speed}
    cfg = config.from_dict({**config.load_recipe("digits-crlc"), "precision": "fp32", "speed": speed})
    local = BATCH // world
    crops = [torch.randn(g.count * local, 1, g.size, g.size, generator=torch.Generator().manual_seed(rank))
             for g in cfg.augment.crops]

    def train(steps: int, poisoned_step: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        state = build_training_state(cfg, 1, WorkerContext(rank, world))
        poisoned = [rank == world - 1 and step == poisoned_step for step in range(steps)]
        flags = [float(train_step(state, crops, local, inject_nan=nan)[1]) for nan in poisoned]
        state.guard.raise_if_diverged(state.step, 1)
        return torch.tensor(flags), nn.utils.parameters_to_vector(state.model.parameters()).detach()

    flags, poisoned = train(3, poisoned_step=1)
    _, clean = train(2, poisoned_step=None)
    return {"flags": flags, "poisoned": poisoned, "clean": clean}


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(run_cases(rank, world), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def gpu_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One rank of an NCCL group on its own GPU: the global-BatchNorm training case (SyncBatchNorm)."""
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = training_case(rank, world, sync_batchnorm=True, device=torch.device("cuda", rank))
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()

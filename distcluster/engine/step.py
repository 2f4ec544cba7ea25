"""One optimiser step, and the one mechanism that skips steps whose values are not finite.

A bad step (a NaN or infinite loss or gradient on any rank) must be skipped on every rank
alike, and on GPUs without making the host wait for the device at every step. NonFiniteGuard
does it in three parts:

1. spread: the loss is multiplied by 1 where it is finite and by NaN where it is not, so a
   non-finite loss always gives NaN gradients (an infinite loss can have finite ones). DDP
   averages gradients over the ranks, which carries the NaN to every rank: each rank then
   reads the same flag off its own gradients, with no collective of its own.
2. flag: `finite` is 1 when every gradient is finite, else 0 (a 0-d tensor on the device).
3. skip: the plain path reads the flag on the host and leaves `optimizer.step()` out. The
   deferred path (a fused optimiser and speed.check_every > 1) never waits: it hands
   1 - finite to the optimiser as `found_inf`, the tensor torch.amp.GradScaler hands fused
   optimisers for the same purpose, and the fused kernel then leaves weights, moments and
   step count as they were. The run of bad steps is counted on the device, and the host
   looks at it every check_every steps and at each epoch's end.

`max_bad` bad steps in a row end the run with TrainingDiverged.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distcluster.common.errors import TrainingDiverged
from distcluster.config import Config, OptimConfig, SpeedConfig
from distcluster.core.networks import ClusterModel
from distcluster.core.objectives import ObjectiveResult


def backward_spreading_non_finite(loss: torch.Tensor) -> None:
    """Backward of `loss`, with every gradient NaN when the loss is not finite (part 1)."""
    (loss * torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))).backward()


def gradients_finite(model: nn.Module) -> torch.Tensor:
    """1.0 when every gradient is finite, else 0.0 (a 0-d tensor; no host sync)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.isfinite(torch.nn.utils.get_total_norm(grads)).float()


class NonFiniteGuard:
    """Skips bad steps and gives up after `max_bad` of them in a row (see the module's text)."""

    def __init__(self, max_bad: int, check_every: int, fused: bool, device: torch.device) -> None:
        self.max_bad, self.check_every = max_bad, check_every
        self.deferred = fused and check_every > 1
        self.run = torch.zeros((), device=device)  # bad steps in a row, now
        self.worst = torch.zeros((), device=device)  # the longest such run since the last check

    def step(self, optimizer: torch.optim.Optimizer, model: nn.Module, step: int, epoch: int) -> torch.Tensor:
        """Update the weights unless some gradient is not finite; returns the finite flag.
        `step` (counted from 1) and `epoch` only name the place in an error."""
        finite = gradients_finite(model)
        self.count(finite)
        if self.deferred:
            optimizer.found_inf = 1 - finite  # the fused kernel skips the update when 1
            optimizer.step()
            if step % self.check_every == 0:
                self.raise_if_diverged(step, epoch)
        elif finite.item() == 1:
            optimizer.step()
        else:  # a good step cannot lengthen a bad run
            self.raise_if_diverged(step, epoch)
        return finite

    def state_dict(self) -> dict[str, float]:
        """The counters a resumed run continues from (a host sync: at checkpoints only)."""
        return {"run": float(self.run), "worst": float(self.worst)}

    def load_state_dict(self, saved: dict[str, float]) -> None:
        """Counters from state_dict; a checkpoint without them (older versions) starts at 0."""
        self.run.fill_(saved.get("run", 0.0))
        self.worst.fill_(saved.get("worst", 0.0))

    def count(self, finite: torch.Tensor) -> None:
        self.run = (self.run + 1) * (1 - finite)
        self.worst = torch.maximum(self.worst, self.run)

    def raise_if_diverged(self, step: int, epoch: int) -> None:
        """TrainingDiverged if max_bad bad steps in a row happened since the last check (a host sync)."""
        worst = int(self.worst.item())
        self.worst = self.run.clone()
        if worst >= self.max_bad:
            raise TrainingDiverged(
                f"loss or gradients not finite for {worst} consecutive steps (by step {step}, "
                f"epoch {epoch}); the last good checkpoint is kept. Lower optim.lr or check the data.")


@dataclass
class TrainingState:
    """What changes while training; everything a checkpoint needs to continue exactly."""

    cfg: Config
    device: torch.device
    model: ClusterModel
    trained: nn.Module  # the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    speed: SpeedConfig  # resolved for the device
    guard: NonFiniteGuard
    epoch: int = 0  # epochs completed
    step: int = 0
    head: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # every epoch's metrics
    lr: float = 0.0  # the learning rate of the latest update

    def checkpoint(self, input_spec: dict[str, Any]) -> dict[str, Any]:
        """A checkpoint of this state (no sampler or RNG state: both derive from (seed, rank, epoch))."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "guard": self.guard.state_dict(), "epoch": self.epoch, "step": self.step,
                "head": self.head, "history": self.history[:self.epoch], "config": self.cfg.to_dict(),
                "input": input_spec}


def autocast_for(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for `precision: bf16`, and for `auto` where bf16 is fast: on GPUs and on CPUs
    with native bf16 instructions (about 2x the fp32 speed there); plain fp32 otherwise."""
    if cfg.precision == "fp32" or (cfg.precision == "auto" and not fast_bf16(device)):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 math is native on `device`: any CUDA GPU, or a CPU with AVX-512 BF16 or AMX.
    On other CPUs torch emulates it: a small-CNN training step on a 2-core AVX2 machine ran 12x
    slower under bf16 autocast than in fp32."""
    return device.type == "cuda" or bool(CPU_BF16_FLAGS & cpu_flags())


CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The processor's feature flags as Linux lists them (empty elsewhere: then no fast bf16)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((row for row in text.splitlines() if row.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def learning_rate(optim: OptimConfig, epoch: int, step: int, epochs: int) -> float:
    """The one learning-rate schedule, for update `step` (counted from 0, skipped updates
    included) in `epoch` (from 0) of `epochs`: optim.lr, times gamma at each milestone epoch
    (schedule: step) or times (1 + cos(pi * epoch / epochs)) / 2 (schedule: cosine, from 1 in
    the first epoch towards 0 in the last), rising linearly over the first warmup_epochs epochs
    ((epoch + 1) / warmup_epochs) and over the first warmup_steps updates ((step + 1) /
    warmup_steps, as IMC-SwAV's code does). A pure function of the config and the counters:
    a resumed run gets the lr its config says."""
    if optim.schedule == "cosine":
        scale = (1 + math.cos(math.pi * epoch / max(1, epochs))) / 2
    else:
        scale = optim.gamma ** sum(epoch >= m for m in optim.milestones)
    if optim.warmup_epochs:
        scale *= min(1.0, (epoch + 1) / optim.warmup_epochs)
    if optim.warmup_steps:
        scale *= min(1.0, (step + 1) / optim.warmup_steps)
    return optim.lr * scale


def set_learning_rate(state: TrainingState) -> None:
    state.lr = learning_rate(state.cfg.optim, state.epoch, state.step, state.cfg.epochs)
    for group in state.optimizer.param_groups:
        group["lr"] = state.lr


def train_step(state: TrainingState, crops: list[torch.Tensor], local_batch: int,
               inject_nan: bool = False) -> tuple[ObjectiveResult, torch.Tensor]:
    """One optimiser step on this rank's crops (groups of `local_batch` images), skipped on
    every rank when any rank's loss or gradient is not finite. A skipped step leaves weights,
    buffers (BatchNorm statistics), optimiser and objective state exactly as they were; only
    the step counter, and with it the learning-rate schedule, moves on. Returns the
    objective's result and the finite flag (a 0-d tensor, the same on every rank).
    `inject_nan` makes the loss NaN (the test hook DISTCLUSTER_TEST_NAN_STEPS)."""
    objective = state.model.objective
    set_learning_rate(state)
    buffers = list(state.model.buffers())
    before = [b.clone() for b in buffers]  # the forward updates BatchNorm statistics in place
    with autocast_for(state.cfg, state.device):
        result = state.trained(crops, local_batch, state.step, state.epoch)
    loss = result.loss * float("nan") if inject_nan else result.loss
    state.optimizer.zero_grad(set_to_none=True)
    backward_spreading_non_finite(loss)
    objective.on_after_backward(state.step)
    state.step += 1
    finite = state.guard.step(state.optimizer, state.model, state.step, state.epoch + 1)
    keep_unless_applied(buffers, before, finite)
    objective.on_step_end(finite)
    return result, finite


@torch.no_grad()
def keep_unless_applied(tensors: list[torch.Tensor], before: list[torch.Tensor],
                        applied: torch.Tensor) -> None:
    """Each tensor back to its value `before` unless `applied` (0-d, 1 or 0) says the step was
    made; on the device, with no host sync, so the deferred path never waits."""
    for now, old in zip(tensors, before, strict=True):
        now.copy_(torch.where(applied > 0, now, old))

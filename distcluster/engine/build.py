"""Everything a worker builds before its first step: model, optimiser, training state.

Ray-free and the same for 0, 1 or N workers: under an initialised process group the
model gets global BatchNorm where asked and a DDP wrapper.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from distcluster.common.errors import ConfigError, RunFailed, one_line
from distcluster.config import Config
from distcluster.core import distributed as dist
from distcluster.core.networks import ClusterModel, build_backbone
from distcluster.core.objectives import CRLC, IIC, IMCSwAV, Objective
from distcluster.data.arrays import ImageSource, image_size
from distcluster.engine.step import NonFiniteGuard, TrainingState


@dataclass
class WorkerContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")


def build_objective(cfg: Config, feature_dim: int) -> Objective:
    """cfg.objective's heads, with the arguments of its config section."""
    objective_class = {"iic": IIC, "imc_swav": IMCSwAV, "crlc": CRLC}[cfg.objective]
    return objective_class(feature_dim, cfg.clusters, getattr(cfg, cfg.objective), prior=cfg.prior)


def build_model(cfg: Config, channels: int) -> ClusterModel:
    backbone = build_backbone(cfg.model, channels)
    return ClusterModel(backbone, build_objective(cfg, backbone.feature_dim))


def build_optimizer(cfg: Config, model: nn.Module, fused: bool = False) -> torch.optim.Optimizer:
    """The optimiser (one fused kernel per step with `fused`); its lr is set before every
    update by engine.step.learning_rate."""
    o = cfg.optim
    # No weight decay on 1-D parameters (biases, BN), as in CRLC's code, unless decay_1d
    # (IMC-SwAV's code decays every parameter).
    decay = [p for p in model.parameters() if p.ndim > 1 or o.decay_1d]
    no_decay = [p for p in model.parameters() if p.ndim <= 1 and not o.decay_1d]
    groups = [{"params": decay, "weight_decay": o.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kernel = {"fused": True} if fused else {}
    if o.name == "sgd":
        optimizer = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, **kernel)
        start_momentum_at_zero(optimizer)
        return optimizer
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=o.lr, betas=o.betas, **kernel)


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """The saved moments and step counts, with the hyperparameters (weight decay, momentum,
    betas) of the config the optimiser was built from: torch's load_state_dict would bring the
    saved ones back, and a changed config would be ignored without a word."""
    configured = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    for group, settings in zip(optimizer.param_groups, configured, strict=True):
        group.update(settings)
    start_momentum_at_zero(optimizer)  # a checkpoint of older versions may lack some buffers


def start_momentum_at_zero(optimizer: torch.optim.Optimizer) -> None:
    """Every SGD momentum buffer that does not exist yet, as zeros. torch creates them at a
    parameter's first update, and its fused kernel with `empty_like` when all are missing: a
    first step skipped on the device (found_inf) then left uninitialised memory in them (3e23
    was seen in a weight), and a parameter whose first gradient comes later (IMC-SwAV's frozen
    prototypes) put a None among the others and crashed the kernel. Zeros give what torch's own
    start gives (with dampening 0 the first buffer is the gradient itself)."""
    for group in optimizer.param_groups:
        if group.get("momentum"):
            for p in group["params"]:
                optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))


def check_fits(cfg: Config, source: ImageSource) -> None:
    """Refuse, before any work starts, a config that cannot run on this data."""
    cfg.validate(image_size(source))
    if cfg.batch_size > len(source):
        raise ConfigError("batch_size", cfg.batch_size,
                          f"larger than the {len(source)} images of '{cfg.data}'")


def build_training_state(cfg: Config, channels: int, ctx: WorkerContext,
                         start: dict[str, Any] | None = None) -> TrainingState:
    """Model, optimiser and schedule from cfg.seed (the same on every rank), or as `start`
    (a checkpoint) left them."""
    speed = cfg.speed.resolved(ctx.device.type == "cuda")
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = build_model(cfg, channels).to(ctx.device)
    if speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model, speed.fused_optimizer)
    guard = NonFiniteGuard(cfg.max_bad_steps, speed.check_every, speed.fused_optimizer, ctx.device)
    state = TrainingState(cfg, ctx.device, model, model, optimizer, speed, guard)
    if start is not None:
        model.load_state_dict(start["model"])
        load_optimizer_state(optimizer, start["optimizer"])
        guard.load_state_dict(start.get("guard", {}))
        state.epoch, state.step, state.head = start["epoch"], start["step"], start["head"]
        state.history = list(start["history"])
    if speed.compile:
        compile_backbone(model.backbone, required=cfg.speed.compile is True)
    if dist.is_distributed():
        state.model = model = batchnorm_for(cfg, model, ctx.device)
        state.trained = data_parallel(model, ctx.device)
    return state


def compile_backbone(backbone: nn.Module, required: bool, backend: str = "inductor",
                     warn: Callable[[str], object] | None = None) -> None:
    """torch.compile the backbone in place (state_dict keys stay the same), one whole graph per
    input shape: a graph break is an error, not a silent split. When compiling fails (a graph
    break, a backend error), a run that asked for it (`speed.compile: true`) stops with the
    reason (RunFailed); under `auto` the reason is printed once and the backbone runs eagerly
    from then on. Errors of the computation itself pass through as they are."""
    compiled = torch.compile(backbone._call_impl, dynamic=False, fullgraph=True, backend=backend)

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return compiled(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as exc:
            reason = one_line(str(exc).split("\n\n")[0], 240)
            if required:
                raise RunFailed(f"torch.compile failed on the backbone ({type(exc).__name__}: {reason}); "
                                "set speed.compile to false (or auto) to run it eagerly") from None
            (warn or _to_stderr)(f"warning: torch.compile failed on the backbone, which now runs eagerly "
                 f"({type(exc).__name__}: {reason})")
            backbone._compiled_call_impl = None  # nn.Module.__call__ then calls the module itself
            return backbone(*args, **kwargs)

    backbone._compiled_call_impl = call  # what nn.Module.compile sets


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def batchnorm_for(cfg: Config, model: ClusterModel, device: torch.device) -> ClusterModel:
    """BatchNorm over the global batch (model.sync_batchnorm; auto: on GPUs) or per worker."""
    gpu = device.type == "cuda"
    wanted = cfg.model.sync_batchnorm
    if not (gpu if wanted == "auto" else wanted):
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model) if gpu else dist.global_batchnorm(model)


CPU_BUCKET_MB = 256  # ResNet-18's 45 MB of gradients and every smaller model: one bucket


def data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP with one wait per collective that matters. Buffers are BatchNorm statistics:
    kept in step by SyncBatchNorm on GPUs, per worker on CPU, so rank 0's are not
    broadcast before every step. On GPUs gradients go in DDP's default buckets, sent
    while backward goes on; on CPU, where backward keeps the worker's cores busy, in
    one bucket: one wait per step instead of one per bucket."""
    if device.type == "cuda":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index],
                                                   forward_sync_buffers=False)
    return nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False,
                                               bucket_cap_mb=CPU_BUCKET_MB)


def input_spec(source: ImageSource, mean: list[float], std: list[float]) -> dict[str, Any]:
    """What predict needs to prepare images for this model."""
    return {"channels": source.channels, "size": list(source.image_shape),
            "mean": mean, "std": std, "class_names": source.class_names}


def set_cpu_speedups() -> None:
    # Sharpening cluster probabilities produce denormals that slow CPU math ~2x.
    torch.set_flush_denormal(True)
    keep_freed_memory()


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> None:
    """Let glibc keep the memory of freed activations for the next step. By default it gives
    large blocks back to the kernel and faults them in again, page by page, at the next step:
    on 2 CPU cores that was 10,000 to 200,000 page faults per training step and up to half of
    the time in the kernel. No-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        pass

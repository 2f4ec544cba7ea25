"""The typed configuration of a run: one dataclass per section, validated as a whole.

Config composes the sections each room defines next to the code they configure: the
objectives' arguments (core.objectives), the backbone (core.networks) and the augmentation
(data.augment); the optimiser, speed switches and run settings are defined here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from distcluster.common.errors import ConfigError, check
from distcluster.core.networks import ModelConfig
from distcluster.core.objectives import ArgumentError, CRLCArguments, IICArguments, IMCSwAVArguments
from distcluster.core.objectives.prior import PRIORS
from distcluster.data.augment import AugmentConfig

OBJECTIVES = ("iic", "imc_swav", "crlc")
MAX_CLUSTERS = 100_000


def check_objective_section(section: str, arguments: Any) -> None:
    """An objective's own argument rules (its `validate`), failing as the config key
    `section.argument`."""
    try:
        arguments.validate()
    except ArgumentError as exc:
        raise ConfigError(f"{section}.{exc.argument}", exc.value, exc.rule) from None


def check_model_name(name: str) -> None:
    """MLflow's rule for registered model names, checked before any training starts, and no '@'
    (models:/NAME@ALIAS could not name the model)."""
    ok = bool(name.strip()) and not any(c in name for c in "/:@") and name != "." \
        and not name.startswith("..")
    check(ok, "register", name, "a registered model name must not be blank, contain '/', ':' or "
                          "'@', or be '.' or start with '..'")


@dataclass
class OptimConfig:
    name: str = "adam"
    lr: float = 5e-4
    betas: tuple[float, float] = (0.8, 0.999)
    momentum: float = 0.9
    weight_decay: float = 1e-5
    schedule: str = "step"  # step: lr *= gamma at each milestone; cosine: half a cosine to 0 over the epochs
    milestones: list[int] = field(default_factory=list)  # epochs where lr *= gamma (schedule: step)
    gamma: float = 0.4
    warmup_epochs: int = 0
    warmup_steps: int = 0  # lr rises linearly over the first N updates (IMC-SwAV's authors: 500)
    decay_1d: bool = False  # weight decay on 1-D parameters (biases, BN) too, as plain Adam does

    def validate(self) -> None:
        check(self.name in ("adam", "adamw", "sgd"), "optim.name", self.name,
               "must be adam, adamw or sgd")
        check(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        check(all(0 <= b < 1 for b in self.betas), "optim.betas", list(self.betas),
               "must be in [0, 1)")
        check(0 <= self.momentum < 1, "optim.momentum", self.momentum, "must be in [0, 1)")
        check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        check(0 < self.gamma <= 1, "optim.gamma", self.gamma, "must be in (0, 1]")
        check(self.schedule in ("step", "cosine"), "optim.schedule", self.schedule, "must be step or cosine")
        check(self.schedule == "step" or not self.milestones, "optim.milestones", self.milestones,
               "must be empty under optim.schedule: cosine (the cosine decays the lr itself)")
        check(self.warmup_epochs >= 0, "optim.warmup_epochs", self.warmup_epochs,
               "must be >= 0")
        check(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "must be >= 0")


@dataclass
class SpeedConfig:
    """Switches of the fast training step; each is true, false or auto (on where it pays).
    Every setting computes the same loss: they change speed, not results."""

    channels_last: bool | str = "auto"  # NHWC tensors into the convolutions (auto: on GPU)
    compile: bool | str = "auto"  # torch.compile the backbone, one graph per crop size (auto: on GPU)
    fused_optimizer: bool | str = "auto"  # one fused kernel per optimiser step (auto: on)
    check_every: int = 0  # steps between the host's looks at the loss guard (0 = auto: 50 GPU, 1 CPU)

    def validate(self) -> None:
        for name in ("channels_last", "compile", "fused_optimizer"):
            value = getattr(self, name)
            check(isinstance(value, bool) or value == "auto", f"speed.{name}", value,
                   "must be true, false or auto")
        check(self.check_every >= 0, "speed.check_every", self.check_every, "must be >= 0 (0 = auto)")

    def resolved(self, gpu: bool) -> SpeedConfig:
        """The switches with `auto` decided for this device."""
        def pick(value: bool | str, auto: bool) -> bool:
            return auto if value == "auto" else bool(value)

        return SpeedConfig(pick(self.channels_last, gpu), pick(self.compile, gpu),
                           pick(self.fused_optimizer, True), self.check_every or (50 if gpu else 1))


@dataclass
class Config:
    """Everything one training run needs. Dotted keys address nested fields."""

    objective: str = "imc_swav"
    data: str = "digits"
    max_samples: int = 0  # use only N images, a fixed random subset (0 = all)
    clusters: int = 10
    prior: str = "uniform"  # cluster sizes pulled to: uniform | estimated | calibrated (matched at argmax)
    epochs: int = 40
    steps_per_epoch: int = 0  # end each epoch after N steps (0 = one pass over the data)
    batch_size: int = 256  # global batch, split evenly over workers
    workers: int = 2  # Ray Train workers (the most, for an elastic group); 0 = in-process, no Ray
    min_workers: int = 0  # set by `workers: MIN-MAX` (an elastic group), never written on its own
    resize_check_seconds: float = 60.0  # elastic groups: how often Ray looks for nodes that came back
    gpu: bool = False
    seed: int = 0
    precision: str = "auto"  # auto | bf16 | fp32 (auto: bf16 where native: GPUs, CPUs with AVX-512 BF16)
    eval_every: int = 1  # epochs between full evaluations (0 = only at the end)
    checkpoint_every: int = 1  # epochs between checkpoints (the last epoch always has one)
    max_bad_steps: int = 20  # consecutive non-finite losses (each step skipped) before giving up
    collapse_threshold: float = 0.0  # largest-cluster fraction called collapse; 0 = min(0.9, 3/K)
    collapse_after_epochs: int = 5  # no collapse warnings during the first epochs
    max_failures: int = 3  # Ray worker-group restarts before the run fails
    on_error: str = "fail"  # a corrupt image in a folder or zip: stop (fail) or leave it out (skip)
    max_resolution: int = 256  # folders and zips are prepared with images of at most this side
    cpus_per_worker: float = 0.0  # 0 = fit the workers onto the machine's CPUs
    output: str = ""  # default: runs/<run_name>
    experiment: str = "distcluster"
    run_name: str = ""
    register: str = ""
    tracking_uri: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    iic: IICArguments = field(default_factory=IICArguments)  # each objective's own typed arguments
    imc_swav: IMCSwAVArguments = field(default_factory=IMCSwAVArguments)
    crlc: CRLCArguments = field(default_factory=CRLCArguments)
    speed: SpeedConfig = field(default_factory=SpeedConfig)

    def validate(self, image_size: int | None = None) -> Config:
        check(self.objective in OBJECTIVES, "objective", self.objective,
               f"must be one of {', '.join(OBJECTIVES)}")
        check(2 <= self.clusters <= MAX_CLUSTERS, "clusters", self.clusters,
               f"K must be in [2, {MAX_CLUSTERS}]")
        check(self.prior in PRIORS, "prior", self.prior, f"must be one of {', '.join(PRIORS)}")
        check(0 <= self.seed < 2**32, "seed", self.seed, "must be in [0, 2**32)")
        check(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        check(self.max_samples >= 0, "max_samples", self.max_samples, "must be >= 0")
        self._validate_workers()
        check(self.precision in ("auto", "bf16", "fp32"), "precision", self.precision,
               "must be auto, bf16 or fp32")
        check(self.eval_every >= 0, "eval_every", self.eval_every, "must be >= 0")
        check(self.steps_per_epoch >= 0, "steps_per_epoch", self.steps_per_epoch, "must be >= 0")
        check(self.checkpoint_every >= 1, "checkpoint_every", self.checkpoint_every, "must be >= 1")
        check(self.max_bad_steps >= 1, "max_bad_steps", self.max_bad_steps, "must be >= 1")
        check(0 <= self.collapse_threshold <= 1, "collapse_threshold", self.collapse_threshold,
               "must be in [0, 1] (0 = automatic)")
        check(self.collapse_after_epochs >= 0, "collapse_after_epochs", self.collapse_after_epochs,
               "must be >= 0")
        check(self.max_failures >= -1, "max_failures", self.max_failures, "must be >= 0 (-1 = no limit)")
        check(self.on_error in ("fail", "skip"), "on_error", self.on_error, "must be fail or skip")
        check(self.max_resolution >= 2, "max_resolution", self.max_resolution, "must be >= 2")
        check(self.cpus_per_worker >= 0, "cpus_per_worker", self.cpus_per_worker,
               "must be >= 0")
        if self.register:
            check_model_name(self.register)
        check(bool(self.experiment.strip()), "experiment", self.experiment, "must not be blank")
        check(self.run_name == "" or (self.run_name not in (".", "..") and not any(
            c in self.run_name for c in "/\\\0")), "run_name", self.run_name,
            "must be one folder name: no '/', '\\', '.' or '..'")
        self.augment.validate(image_size)  # first: the checks below read the crop groups
        if self.objective in ("crlc", "iic"):
            check(self.augment.num_crops >= 2, "augment.crops", self.augment.num_crops,
                   f"{self.objective} needs at least 2 crops")
        if self.objective == "imc_swav":
            check(self.augment.crops[0].count >= 2, "augment.crops[0].count",
                   self.augment.crops[0].count, "imc_swav needs 2 large crops in the first group")
        for section in (self.model, self.optim, self.speed):
            section.validate()
        if self.model.backbone == "small_cnn":  # stages - 1 halvings, then a pool x pool grid
            smallest = min(crop.size for crop in self.augment.crops)
            needed = 2 ** (self.model.stages - 1) * self.model.pool
            check(smallest >= needed, "model.stages", self.model.stages,
                   f"{self.model.stages} stages with model.pool {self.model.pool} need crops of "
                   f"at least {needed} px and the smallest is {smallest}: lower model.stages or "
                   "model.pool, or make the crops larger")
        for name in OBJECTIVES:
            check_objective_section(name, getattr(self, name))
        return self

    def _validate_workers(self) -> None:
        check(self.workers >= 0, "workers", self.workers, "must be >= 0")
        check(0 <= self.min_workers <= self.workers, "min_workers", self.min_workers,
               f"must be in [0, workers={self.workers}] (0 = a fixed group)")
        check(self.resize_check_seconds > 0, "resize_check_seconds", self.resize_check_seconds,
               "must be > 0")
        sizes = self.group_sizes()
        check(self.batch_size >= 2 * max(sizes), "batch_size", self.batch_size,
               "must be at least 2 per worker")
        for size in sizes:  # each worker's share of the global batch is whole
            check(self.batch_size % size == 0, "batch_size", self.batch_size,
                   f"must be divisible by {size} workers" + (
                       f" (every group size from {sizes[0]} to {sizes[-1]})" if self.elastic else ""))

    @property
    def elastic(self) -> bool:
        """An elastic Ray worker group: min_workers..workers, resized as nodes leave and return."""
        return 0 < self.min_workers < self.workers

    def group_sizes(self) -> list[int]:
        """Every worker count the run may train with (1 for the in-process run)."""
        return list(range(self.min_workers, self.workers + 1)) if self.elastic else [max(1, self.workers)]

    def to_dict(self) -> dict[str, Any]:
        """Every key as a recipe would write it: an elastic group as `workers: MIN-MAX`, so that
        overriding `workers` with a whole number later gives a fixed group, not MIN..N."""
        values = _plain(dataclasses.asdict(self))
        low = values.pop("min_workers")
        if self.elastic:
            values["workers"] = f"{low}-{self.workers}"
        return values

    def flat(self) -> dict[str, Any]:
        """Dotted key -> value, for logging params (`optim.lr: 0.0005`)."""
        return dict(flatten_keys(self.to_dict()))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def flatten_keys(tree: dict[str, Any], prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from flatten_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value

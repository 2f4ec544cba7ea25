"""Typed, validated configuration: dataclasses + YAML recipes + `key=value` overrides.

One config system for everything: packaged recipes (distcluster/recipes/*.yaml),
`--set section.key=value` on the command line and Ray Tune search spaces all
address the same dotted keys, e.g. `optim.lr` or `imc_swav.temperature`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from distcluster.errors import ConfigError, UserError

OBJECTIVES = ("iic", "imc_swav", "crlc")
BACKBONES = ("small_cnn", "resnet18", "resnet34")
MAX_CLUSTERS = 100_000
MAX_YAML_BYTES = 1 << 20  # a recipe or search space is a few kB
MAX_YAML_ALIASES = 20  # at most ~1,500 values after expansion; recipes need none


def _check(ok: bool, key: str, value: object, reason: str) -> None:
    if not ok:
        raise ConfigError(key, value, reason)


def _objective_arguments(check: Callable[..., None], section: str, values: Any) -> None:
    """The objective's own argument rules, failing as the config key `section.argument`."""
    from distcluster.objectives.base import ArgumentError

    try:
        check(**dataclasses.asdict(values))
    except ArgumentError as exc:
        raise ConfigError(f"{section}.{exc.argument}", exc.value, exc.rule) from None


def check_model_name(name: str) -> None:
    """MLflow's rule for registered model names, checked before any training starts."""
    ok = bool(name.strip()) and not any(c in name for c in "/:") and name != "." \
        and not name.startswith("..")
    _check(ok, "register", name, "a registered model name must not be blank, contain '/' or ':', "
                          "or be '.' or start with '..'")


def _check_range(key: str, pair: tuple[float, float], low: float, high: float) -> None:
    ok = len(pair) == 2 and low <= pair[0] <= pair[1] <= high
    _check(ok, key, list(pair), f"must be [min, max] with {low} <= min <= max <= {high}")


@dataclass
class CropGroup:
    """`count` crops of `size` px covering `scale` of the image area, aspect `ratio`. A `plain`
    group is cropped and resized only: no flip, rotation, shear, colour, blur or solarize
    (IIC's anchor view x, paired with transformed views g(x))."""

    count: int = 2
    size: int = 28
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    plain: bool = False

    def validate(self, key: str) -> None:
        _check(self.count >= 1, f"{key}.count", self.count, "must be >= 1")
        _check(self.size >= 2, f"{key}.size", self.size, "must be >= 2")
        _check_range(f"{key}.scale", self.scale, 1e-3, 1.0)
        _check_range(f"{key}.ratio", self.ratio, 1e-2, 1e2)


@dataclass
class AugmentConfig:
    """Multi-crop augmentation, run as batched tensor ops on the training device."""

    crops: list[CropGroup] = field(
        default_factory=lambda: [CropGroup(2, 28, (0.2, 1.0)), CropGroup(4, 18, (0.08, 0.4))]
    )
    flip: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    grey_p: float = 0.25
    rotate_degrees: float = 0.0
    shear_degrees: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # pixels of the crop
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5  # in [0, 1] pixel units

    def validate(self, image_size: int | None = None) -> None:
        _check(len(self.crops) >= 1, "augment.crops", self.crops, "needs at least one group")
        for i, group in enumerate(self.crops):
            group.validate(f"augment.crops[{i}]")
            if image_size is not None:
                _check(group.size <= image_size, f"augment.crops[{i}].size", group.size,
                       f"crop larger than the {image_size} px images")
        for name in ("flip", "jitter_p", "grey_p", "blur_p", "solarize_p", "solarize_threshold"):
            value = getattr(self, name)
            _check(0.0 <= value <= 1.0, f"augment.{name}", value, "probability must be in [0, 1]")
        _check(len(self.jitter) == 4 and all(v >= 0 for v in self.jitter), "augment.jitter",
               list(self.jitter), "must be 4 non-negative numbers (brightness, contrast, "
               "saturation, hue)")
        _check(self.jitter[3] <= 0.5, "augment.jitter", list(self.jitter), "hue must be <= 0.5")
        _check(0 <= self.rotate_degrees <= 180, "augment.rotate_degrees", self.rotate_degrees,
               "must be in [0, 180]")
        _check(0 <= self.shear_degrees < 90, "augment.shear_degrees", self.shear_degrees,
               "must be in [0, 90)")
        _check_range("augment.blur_sigma", self.blur_sigma, 0.0, 100.0)

    @property
    def num_crops(self) -> int:
        return sum(group.count for group in self.crops)


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    width: int = 64  # small_cnn only: channels of the first stage
    # BatchNorm statistics over the global batch (true), per worker (false), or auto: global on
    # GPUs (SyncBatchNorm over NCCL), per worker on CPUs (two gloo collectives per layer cost more
    # than they give there). Only global statistics make N workers equal one process in training.
    sync_batchnorm: bool | str = "auto"

    def validate(self) -> None:
        _check(self.backbone in BACKBONES, "model.backbone", self.backbone,
               f"must be one of {', '.join(BACKBONES)}")
        _check(self.width >= 4, "model.width", self.width, "must be >= 4")
        _check(isinstance(self.sync_batchnorm, bool) or self.sync_batchnorm == "auto",
               "model.sync_batchnorm", self.sync_batchnorm, "must be true, false or auto")


@dataclass
class IICConfig:
    """IIC (arXiv 1807.06653): over-clustering head + main head, each with sub-heads.

    As the authors' code: the first crop is the anchor x and every other crop a g(x); all
    (x, g(x)) pairs are pooled into one joint per sub-head (`pairing: anchor`), and the heads
    take turns by epoch, over-clustering head for head_epochs[0] epochs, then the main head
    for head_epochs[1]. `pairing: all_pairs` (one loss per pair of crops, averaged) and
    head_epochs [0, 0] (both heads every step) are distcluster variants."""

    overclusters: int = 70
    subheads: int = 5
    lamb: float = 1.0  # marginal weight; > 1 pushes towards balanced clusters
    pairing: str = "anchor"
    head_epochs: tuple[int, int] = (1, 2)  # (over-clustering, main); (0, 0) = both every step

    def validate(self) -> None:
        from distcluster.objectives import IIC

        _objective_arguments(IIC.check_arguments, "iic", self)


@dataclass
class IMCSwAVConfig:
    """IMC-SwAV (arXiv 2103.07368): SwAV prototypes + MI(classifier; prototypes)."""

    prototypes: int = 1000
    projection_hidden: int = 512
    projection_dim: int = 128
    classifier_hidden: int = 1024
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    entropy_weight: float = 4.0  # b in H(Y|U) - b H(Y)
    logit_penalty: float = 0.01
    logit_bound: float = 5.0
    freeze_prototypes_steps: int = 500  # the authors' warm-up: 500 updates (with optim.warmup_steps)
    same_crop_pairs: bool = True  # the MI term averages all V x V crop pairs, (j, j) included
    projection_nonlinear: bool = False  # BN + ReLU inside the projection (authors: Linear, Linear)

    def validate(self) -> None:
        from distcluster.objectives import IMCSwAV

        _objective_arguments(IMCSwAV.check_arguments, "imc_swav", self)


@dataclass
class CRLCConfig:
    """CRLC (arXiv 2107.11635): feature InfoNCE + probability InfoNCE + marginal entropy."""

    subheads: int = 10
    hidden: int = 512
    projection_dim: int = 128  # the representation head's output (NT-Xent features)
    temperature: float = 0.1
    smoothing: float = 0.01
    entropy_weight: float = 2.0
    feature_weight: float = 10.0
    logit_bound: float = 25.0
    logit_penalty: float = 0.01  # weight of the penalty on logits outside +-logit_bound

    def validate(self) -> None:
        from distcluster.objectives import CRLC

        _objective_arguments(CRLC.check_arguments, "crlc", self)


@dataclass
class OptimConfig:
    name: str = "adam"
    lr: float = 5e-4
    betas: tuple[float, float] = (0.8, 0.999)
    momentum: float = 0.9
    weight_decay: float = 1e-5
    milestones: list[int] = field(default_factory=list)  # epochs where lr *= gamma
    gamma: float = 0.4
    warmup_epochs: int = 0
    warmup_steps: int = 0  # lr rises linearly over the first N updates (IMC-SwAV's authors: 500)
    decay_1d: bool = False  # weight decay on 1-D parameters (biases, BN) too, as plain Adam does

    def validate(self) -> None:
        _check(self.name in ("adam", "adamw", "sgd"), "optim.name", self.name,
               "must be adam, adamw or sgd")
        _check(self.lr > 0, "optim.lr", self.lr, "must be > 0")
        _check(all(0 <= b < 1 for b in self.betas), "optim.betas", list(self.betas),
               "must be in [0, 1)")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be >= 0")
        _check(0 < self.gamma <= 1, "optim.gamma", self.gamma, "must be in (0, 1]")
        _check(self.warmup_epochs >= 0, "optim.warmup_epochs", self.warmup_epochs,
               "must be >= 0")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "must be >= 0")


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
            _check(isinstance(value, bool) or value == "auto", f"speed.{name}", value,
                   "must be true, false or auto")
        _check(self.check_every >= 0, "speed.check_every", self.check_every, "must be >= 0 (0 = auto)")

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
    epochs: int = 40
    batch_size: int = 256  # global batch, split evenly over workers
    workers: int = 2  # Ray Train workers (the most, for an elastic group); 0 = in-process, no Ray
    min_workers: int = 0  # set by `workers: MIN-MAX` (an elastic group), never written on its own
    resize_check_seconds: float = 60.0  # elastic groups: how often Ray looks for nodes that came back
    gpu: bool = False
    seed: int = 0
    precision: str = "auto"  # auto | bf16 | fp32 (auto: bf16 autocast on CPU and GPU)
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
    iic: IICConfig = field(default_factory=IICConfig)
    imc_swav: IMCSwAVConfig = field(default_factory=IMCSwAVConfig)
    crlc: CRLCConfig = field(default_factory=CRLCConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)

    def validate(self, image_size: int | None = None) -> Config:
        _check(self.objective in OBJECTIVES, "objective", self.objective,
               f"must be one of {', '.join(OBJECTIVES)}")
        _check(2 <= self.clusters <= MAX_CLUSTERS, "clusters", self.clusters,
               f"K must be in [2, {MAX_CLUSTERS}]")
        _check(0 <= self.seed < 2**32, "seed", self.seed, "must be in [0, 2**32)")
        _check(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        _check(self.max_samples >= 0, "max_samples", self.max_samples, "must be >= 0")
        self._validate_workers()
        _check(self.precision in ("auto", "bf16", "fp32"), "precision", self.precision,
               "must be auto, bf16 or fp32")
        _check(self.eval_every >= 0, "eval_every", self.eval_every, "must be >= 0")
        _check(self.checkpoint_every >= 1, "checkpoint_every", self.checkpoint_every, "must be >= 1")
        _check(self.max_bad_steps >= 1, "max_bad_steps", self.max_bad_steps, "must be >= 1")
        _check(0 <= self.collapse_threshold <= 1, "collapse_threshold", self.collapse_threshold,
               "must be in [0, 1] (0 = automatic)")
        _check(self.collapse_after_epochs >= 0, "collapse_after_epochs", self.collapse_after_epochs,
               "must be >= 0")
        _check(self.max_failures >= -1, "max_failures", self.max_failures, "must be >= 0 (-1 = no limit)")
        _check(self.on_error in ("fail", "skip"), "on_error", self.on_error, "must be fail or skip")
        _check(self.max_resolution >= 2, "max_resolution", self.max_resolution, "must be >= 2")
        _check(self.cpus_per_worker >= 0, "cpus_per_worker", self.cpus_per_worker,
               "must be >= 0")
        if self.register:
            check_model_name(self.register)
        _check(self.run_name == "" or (self.run_name not in (".", "..") and not any(
            c in self.run_name for c in "/\\\0")), "run_name", self.run_name,
            "must be one folder name: no '/', '\\', '.' or '..'")
        if self.objective in ("crlc", "iic"):
            _check(self.augment.num_crops >= 2, "augment.crops", self.augment.num_crops,
                   f"{self.objective} needs at least 2 crops")
        if self.objective == "imc_swav":
            _check(self.augment.crops[0].count >= 2, "augment.crops[0].count",
                   self.augment.crops[0].count, "imc_swav needs 2 large crops in the first group")
        for section in (self.model, self.optim, self.iic, self.imc_swav, self.crlc, self.speed):
            section.validate()
        self.augment.validate(image_size)
        return self

    def _validate_workers(self) -> None:
        _check(self.workers >= 0, "workers", self.workers, "must be >= 0")
        _check(0 <= self.min_workers <= self.workers, "min_workers", self.min_workers,
               f"must be in [0, workers={self.workers}] (0 = a fixed group)")
        _check(self.resize_check_seconds > 0, "resize_check_seconds", self.resize_check_seconds,
               "must be > 0")
        sizes = self.group_sizes()
        _check(self.batch_size >= 2 * max(sizes), "batch_size", self.batch_size,
               "must be at least 2 per worker")
        for size in sizes:  # each worker's share of the global batch is whole
            _check(self.batch_size % size == 0, "batch_size", self.batch_size,
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
        return dict(_flatten(self.to_dict()))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _flatten(tree: dict[str, Any], prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


# ---------------------------------------------------------------- building
def _coerce(key: str, annotation: Any, value: Any) -> Any:
    """Convert a YAML value to the field's declared type, or raise ConfigError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        _check(isinstance(value, dict), key, value, "must be a mapping")
        return _build(annotation, value, f"{key}.")
    if origin in (list, tuple):
        _check(isinstance(value, (list, tuple)), key, value, "must be a list")
        if origin is tuple:
            _check(len(value) == len(args), key, value, f"must have {len(args)} items")
            return tuple(_coerce(key, a, v) for a, v in zip(args, value, strict=True))
        return [_coerce(f"{key}[{i}]", args[0], v) for i, v in enumerate(value)]
    if origin in (types.UnionType, typing.Union):
        return value
    if annotation is bool:
        _check(isinstance(value, bool), key, value, "must be true or false")
        return value
    if annotation is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, value,
               "must be an integer")
        return value
    if annotation is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, value,
               "must be a number")
        _check(math.isfinite(value), key, value, "must be a finite number")
        return float(value)
    if annotation is str:
        _check(isinstance(value, (str, int, float)) and not isinstance(value, bool), key, value,
               "must be a string")
        return str(value)
    return value


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ConfigError(f"{prefix}{key}", values[key], "unknown config key")
    kwargs = {k: _coerce(f"{prefix}{k}", hints[k], v) for k, v in values.items()}
    return cls(**kwargs)


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


WORKER_RANGE = re.compile(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", re.ASCII)


def from_dict(values: dict[str, Any]) -> Config:
    """Build a Config from a (possibly partial) nested dict; unknown keys raise."""
    return _build(Config, _worker_range(merge(Config().to_dict(), values)))


def _worker_range(values: dict[str, Any]) -> dict[str, Any]:
    """`workers: MIN-MAX` (in a recipe, --set, --workers or a Tune space) is an elastic group:
    min_workers MIN, workers MAX. A whole number (also quoted) is a fixed group."""
    _check("min_workers" not in values, "min_workers", values.get("min_workers"),
           "unknown config key: write workers: MIN-MAX")
    text = values.get("workers")
    if not isinstance(text, str):
        return values
    found = WORKER_RANGE.fullmatch(text)
    _check(found is not None, "workers", text, "must be a whole number or MIN-MAX (e.g. 1-4)")
    low, high = found.groups()
    if high is None:
        return {**values, "min_workers": 0, "workers": int(low)}
    _check(1 <= int(low) <= int(high), "workers", text, "MIN-MAX needs 1 <= MIN <= MAX")
    return {**values, "min_workers": int(low), "workers": int(high)}


def apply_override(values: dict[str, Any], text: str) -> dict[str, Any]:
    """`values` (a partial config dict) with `KEY=VALUE` applied, the value parsed as YAML. The
    one resolver of dotted keys for recipes, --set and Tune: numeric parts index lists
    (`augment.crops.1.size=16`), and an unknown key raises ConfigError."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set expects KEY=VALUE, got {text!r}")
    value = safe_yaml(raw, f"--set {key}") if raw.strip() else ""
    return assign(merge(Config().to_dict(), values), key.strip(), value)


def assign(values: Any, dotted: str, value: Any, _done: str = "") -> Any:
    """A copy of the complete config dict `values` with `dotted` set to `value`. Numeric parts
    index lists: `augment.crops.1.size`. Unknown keys and missing items raise ConfigError."""
    head, _, rest = dotted.partition(".")
    where = _done + head
    if isinstance(values, list):
        _check(head.isdigit() and int(head) < len(values), where, value,
               f"no item {head} in a list of {len(values)}")
        copied = list(values)
        copied[int(head)] = assign(values[int(head)], rest, value, where + ".") if rest else value
        return copied
    _check(isinstance(values, dict) and head in values, where, value, "unknown config key")
    return {**values, head: assign(values[head], rest, value, where + ".") if rest else value}


def recipe_names() -> list[str]:
    folder = resources.files("distcluster") / "recipes"
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """A packaged recipe by name (`digits-imc-swav`) or a YAML file path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        text = read_text_file(path, "config file")
    else:
        resource = resources.files("distcluster") / "recipes" / f"{name_or_path}.yaml"
        if not resource.is_file():
            raise UserError(f"unknown recipe '{name_or_path}' (packaged recipes: "
                            f"{', '.join(recipe_names())})")
        text = resource.read_text()
    values = safe_yaml(text, f"config {name_or_path}")
    if not isinstance(values, dict):
        raise UserError(f"config {name_or_path}: top level must be a mapping")
    return values


def default_recipe(objective: str, data: str) -> str | None:
    """The recipe used when --config is not given: tuned settings for the embedded data."""
    return f"digits-{objective.replace('_', '-')}" if data == "digits" else None


def read_text_file(path: Path, what: str) -> str:
    """A small UTF-8 text file (a regular file, at most MAX_YAML_BYTES), or one line, exit 2."""
    if not path.is_file():
        raise UserError(f"{what} not found (or not a regular file): {path}")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise UserError(f"{what} {path}: larger than {MAX_YAML_BYTES} bytes")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{what} {path}: not UTF-8 text") from None
    except OSError as exc:
        raise UserError(f"{what} {path}: cannot read it ({exc.strerror})") from None


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses documents with more than MAX_YAML_ALIASES aliases: a few
    nested aliases expand into billions of values ("billion laughs")."""

    aliases = 0

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_YAML_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_YAML_ALIASES} aliases (*name)")
        return super().compose_node(parent, index)


def safe_yaml(text: str, what: str) -> Any:
    """Parse YAML text with no Python tags and bounded aliases; errors as one line."""
    if len(text) > MAX_YAML_BYTES:
        raise UserError(f"{what}: YAML larger than {MAX_YAML_BYTES} characters")
    try:
        return yaml.load(text, Loader=_BoundedLoader)
    except yaml.YAMLError as exc:
        raise UserError(f"{what}: invalid YAML ({exc})") from None

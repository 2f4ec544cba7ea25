"""Search spaces for `distcluster.tune`: YAML files that map config keys to distributions.

    # tune_spaces/NAME.yaml
    base: digits-imc-swav        # a packaged recipe, a YAML path, or an inline config mapping
    set:                         # fixed for every trial (dotted keys)
      epochs: 12
    space:                       # one distribution per dotted key; numbers index lists
      clusters: {choice: [8, 10, 12]}
      imc_swav.temperature: {loguniform: [0.05, 0.3]}
      augment.crops.1.count: {grid_search: [2, 4]}
      seed: {randint: [0, 100]}  # both ends included
    sweep: {samples: 8, grace_period: 3, reduction_factor: 2, max_concurrent: 0, search: random}

Everything is checked before a trial starts: unknown keys, empty choices,
impossible ranges, and every value a trial could draw (each choice, each end of
a range) must give a valid config.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distcluster import config as configuration
from distcluster.common.errors import ConfigError, UserError
from distcluster.config import Config

KINDS = ("choice", "grid_search", "uniform", "loguniform", "randint")
SEARCHES = ("random", "optuna")
SECTIONS = ("base", "set", "space", "sweep")


@dataclass(frozen=True)
class SweepSettings:
    """How a sweep runs (a space's `sweep:` section, then tune's flags)."""

    samples: int = 8  # trials (with grid_search: repeats of the grid)
    grace_period: int = 2  # epochs every trial runs before ASHA may stop it (>= epochs: never)
    reduction_factor: int = 2  # ASHA keeps the best 1/reduction_factor at each rung
    max_concurrent: int = 0  # 0 = as many trials as the cluster's CPUs (or GPUs) hold
    search: str = "random"  # random (Tune's variant generator) | optuna (TPE)

    def overridden(self, values: dict[str, Any]) -> SweepSettings:
        """These settings with `values` (None: keep) in their place, checked."""
        settings = dataclasses.replace(self, **{k: v for k, v in values.items() if v is not None})
        settings.check()
        return settings

    def check(self, where: str = "") -> None:
        """Impossible settings (from the space or the command line) as one line."""
        minimum = {"samples": 1, "grace_period": 1, "reduction_factor": 2, "max_concurrent": 0}
        for key, low in minimum.items():
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise UserError(f"{where}'{key}' must be an integer >= {low} (got {value!r})")


@dataclass(frozen=True)
class Dimension:
    """One searched key: `values` are the choices, or (low, high) for a range (randint: both
    included). Validation tries each of them."""

    key: str
    kind: str
    values: tuple[Any, ...]


@dataclass
class SearchSpace:
    name: str
    base: dict[str, Any]  # the complete config every trial starts from
    dimensions: list[Dimension]
    sweep: SweepSettings

    def trial_config(self, sampled: dict[str, Any]) -> Config:
        values = self.base
        for key, value in sampled.items():
            values = configuration.assign(values, key, value)
        return configuration.from_dict(values)

    def extreme_configs(self) -> Iterator[Config]:
        """The base with each dimension, in turn, at each of its extremes."""
        yield configuration.from_dict(self.base)
        for dim in self.dimensions:
            for value in dim.values:
                yield self.trial_config({dim.key: value})

    def check_search(self, search: str) -> None:
        if search not in SEARCHES:
            raise UserError(f"tune space {self.name}: search must be one of {', '.join(SEARCHES)} "
                            f"(got {search!r})")
        grid = [d.key for d in self.dimensions if d.kind == "grid_search"]
        if search == "optuna" and grid:
            raise UserError(f"tune space {self.name}: optuna cannot search grid_search keys "
                            f"({', '.join(grid)}); use choice")


def space_folders() -> list[Path]:
    """./tune_spaces, then the one beside the package (a source checkout or editable install)."""
    return [Path.cwd() / "tune_spaces", Path(__file__).resolve().parents[2] / "tune_spaces"]


def space_names() -> list[str]:
    return sorted({p.stem for folder in space_folders() if folder.is_dir() for p in folder.glob("*.yaml")})


def find_space(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"tune space file not found: {name_or_path}")
        return path
    for folder in space_folders():
        if (folder / f"{name_or_path}.yaml").is_file():
            return folder / f"{name_or_path}.yaml"
    raise UserError(f"unknown tune space '{name_or_path}' (spaces: {', '.join(space_names()) or 'none'})")


def load_space(name_or_path: str) -> SearchSpace:
    """Read and check a space; every problem is a UserError naming the space and key."""
    path = find_space(name_or_path)
    name = path.stem
    text = configuration.read_text_file(path, "tune space")
    raw = configuration.safe_yaml(text, f"tune space {name}") or {}
    try:
        return _parse(name, raw)
    except ConfigError as exc:
        raise UserError(f"tune space {name}: {exc}") from None


def _fail(name: str, key: str, reason: str) -> None:
    raise UserError(f"tune space {name}: '{key}': {reason}")


def _parse(name: str, raw: Any) -> SearchSpace:
    if not isinstance(raw, dict):
        raise UserError(f"tune space {name}: top level must be a mapping")
    for section in raw:
        if section not in SECTIONS:
            _fail(name, section, f"unknown section (sections: {', '.join(SECTIONS)})")
    base = _base_values(name, raw.get("base", {}))
    for key, value in _mapping(name, raw, "set").items():
        base = configuration.assign(base, key, value)
    dimensions = [_dimension(name, key, spec) for key, spec in _mapping(name, raw, "space").items()]
    if not dimensions:
        _fail(name, "space", "no keys to search")
    space = SearchSpace(name, configuration.from_dict(base).to_dict(), dimensions,
                        _sweep(name, _mapping(name, raw, "sweep")))
    for cfg in space.extreme_configs():
        cfg.validate()
    _check_ranges_draw_fractions_only_for_numbers(space)
    space.check_search(space.sweep.search)
    return space


def _check_ranges_draw_fractions_only_for_numbers(space: SearchSpace) -> None:
    """uniform and loguniform draw fractions: on an integer key (clusters, epochs) every trial
    would fail when it starts, so the space is refused now, with what to use instead."""
    for dim in space.dimensions:
        if dim.kind in ("uniform", "loguniform"):
            low, high = dim.values
            inside = (low + high) / 2 if dim.kind == "uniform" else math.sqrt(low * high)
            try:
                space.trial_config({dim.key: inside})
            except ConfigError as exc:
                _fail(space.name, dim.key, f"{dim.kind} draws fractions such as {inside:g}, which it "
                      f"refuses ({exc}); use randint or choice")


def _mapping(name: str, raw: dict[str, Any], section: str) -> dict[str, Any]:
    value = raw.get(section) or {}
    if not isinstance(value, dict):
        _fail(name, section, "must be a mapping")
    return value


def _base_values(name: str, base: Any) -> dict[str, Any]:
    if isinstance(base, str):
        base = configuration.load_recipe(base)
    if not isinstance(base, dict):
        _fail(name, "base", "must be a recipe name, a YAML path or a config mapping")
    return configuration.from_dict(base).to_dict()


def _dimension(name: str, key: str, spec: Any) -> Dimension:
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        _fail(name, key, f"must be one of {{{'|'.join(KINDS)}: ...}}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        _fail(name, key, f"{kind} needs a non-empty list")
    if kind in ("choice", "grid_search"):
        return Dimension(key, kind, tuple(values))
    numbers = len(values) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                       for v in values)
    if not numbers or not values[0] < values[1]:
        _fail(name, key, f"{kind} needs [low, high] with low < high (got {values})")
    if kind == "loguniform" and values[0] <= 0:
        _fail(name, key, f"loguniform needs low > 0 (got {values})")
    if kind == "randint" and not all(isinstance(v, int) for v in values):
        _fail(name, key, f"randint needs integer ends (got {values})")
    if not all(math.isfinite(v) for v in values):
        _fail(name, key, f"{kind} needs finite ends (got {values})")
    return Dimension(key, kind, tuple(values))


def _sweep(name: str, given: dict[str, Any]) -> SweepSettings:
    known = [f.name for f in dataclasses.fields(SweepSettings)]
    for key in given:
        if key not in known:
            _fail(name, f"sweep.{key}", f"unknown setting (settings: {', '.join(known)})")
    sweep = SweepSettings(**given)
    sweep.check(f"tune space {name}: ")
    return sweep


"""Building a Config from nested dicts: recipes, flags, `--set KEY=VALUE` and Tune samples
all go through `from_dict` and `apply_override`, which know every key and type."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any

from distcluster.common.errors import ConfigError, UserError, check
from distcluster.config.recipes import safe_yaml
from distcluster.config.schema import Config


def _coerce(key: str, annotation: Any, value: Any) -> Any:
    """Convert a YAML value to the field's declared type, or raise ConfigError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if dataclasses.is_dataclass(annotation):
        check(isinstance(value, dict), key, value, "must be a mapping")
        return _build(annotation, value, f"{key}.")
    if origin in (list, tuple):
        check(isinstance(value, (list, tuple)), key, value, "must be a list")
        if origin is tuple:
            check(len(value) == len(args), key, value, f"must have {len(args)} items")
            return tuple(_coerce(key, a, v) for a, v in zip(args, value, strict=True))
        return [_coerce(f"{key}[{i}]", args[0], v) for i, v in enumerate(value)]
    if origin in (types.UnionType, typing.Union):
        return value
    if annotation is bool:
        check(isinstance(value, bool), key, value, "must be true or false")
        return value
    if annotation is int:
        check(isinstance(value, int) and not isinstance(value, bool), key, value,
               "must be an integer")
        return value
    if annotation is float:
        check(isinstance(value, (int, float)) and not isinstance(value, bool), key, value,
               "must be a number")
        check(math.isfinite(value), key, value, "must be a finite number")
        return float(value)
    if annotation is str:
        check(isinstance(value, (str, int, float)) and not isinstance(value, bool), key, value,
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
    check("min_workers" not in values, "min_workers", values.get("min_workers"),
           "unknown config key: write workers: MIN-MAX")
    text = values.get("workers")
    if not isinstance(text, str):
        return values
    found = WORKER_RANGE.fullmatch(text)
    check(found is not None, "workers", text, "must be a whole number or MIN-MAX (e.g. 1-4)")
    low, high = found.groups()
    if high is None:
        return {**values, "min_workers": 0, "workers": int(low)}
    check(1 <= int(low) <= int(high), "workers", text, "MIN-MAX needs 1 <= MIN <= MAX")
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
        check(head.isdigit() and int(head) < len(values), where, value,
               f"no item {head} in a list of {len(values)}")
        copied = list(values)
        copied[int(head)] = assign(values[int(head)], rest, value, where + ".") if rest else value
        return copied
    check(isinstance(values, dict) and head in values, where, value, "unknown config key")
    return {**values, head: assign(values[head], rest, value, where + ".") if rest else value}

"""Recipes (named YAML configs packaged in distcluster/recipes) and safe YAML reading."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from distcluster.common.errors import UserError

MAX_YAML_BYTES = 1 << 20  # a recipe or search space is a few kB
MAX_YAML_ALIASES = 20  # at most ~1,500 values after expansion; recipes need none


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


# YAML 1.1 reads 1e-3 (no dot) as a string; YAML 1.2 and every user read it as a number.
_BoundedLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def safe_yaml(text: str, what: str) -> Any:
    """Parse YAML text with no Python tags and bounded aliases; errors as one line."""
    if len(text) > MAX_YAML_BYTES:
        raise UserError(f"{what}: YAML larger than {MAX_YAML_BYTES} characters")
    try:
        return yaml.load(text, Loader=_BoundedLoader)
    except yaml.YAMLError as exc:
        raise UserError(f"{what}: invalid YAML ({exc})") from None

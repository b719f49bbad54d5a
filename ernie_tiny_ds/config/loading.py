"""A recipe from its YAML file (or a bundled one by name) and the command line's overrides."""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from ..errors import ConfigError
from . import paths, strict_yaml
from .overrides import apply_overrides
from .recipe import Recipe, from_dict

BUNDLED = Path(__file__).resolve().parent.parent / "recipes"


def _read(path: str | os.PathLike) -> dict:
    """The file's values, paths anchored to its folder (a bundled recipe's are not: the package is no
    folder of the user's)."""
    p = Path(path)
    bundled = BUNDLED / f"{path}.yaml"
    by_name = not p.is_file() and p.suffix == "" and bundled.is_file()
    if by_name:
        p = bundled  # a bundled recipe by name: `--config demo`
    if not p.is_file():
        raise ConfigError(f"recipe file not found: {p}")
    try:
        values = strict_yaml.load(p.read_text(encoding="utf-8"), lambda line: f"{p}:{line}") or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{p}: a recipe must be a mapping of sections")
    return values if by_name else paths.anchor(values, p.parent.resolve())


def load_recipe(path: str | os.PathLike | None, overrides: list[str] | None = None) -> Recipe:
    """Read a YAML recipe (or start from defaults when path is None) and apply overrides."""
    values = _read(path) if path is not None else {}
    values = apply_overrides(values, overrides or [])
    recipe = from_dict(values, source=str(path or "overrides"))
    recipe.command_line = list(overrides or [])  # for_stage picks the ones a stage can override
    return recipe

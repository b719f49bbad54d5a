"""Paths written in a recipe file are relative to the recipe's folder, so a recipe folder can move as
a whole; paths on the command line are relative to the current folder.

Every path key is anchored, output_dir included, whether or not the path exists yet: a relative
path never means the recipe's folder on one run and the current folder on another. The keys that
also take a Hugging Face Hub ID (models, tokenizers, datasets) keep the Hub's own rule: a folder
beside the recipe is that folder, and a value shaped like a Hub ID (`owner/name`) that is not
one is the Hub ID.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..data.hub import looks_like_hub_id
from .recipe import Recipe
from .rules import PathKind, rules_of, settings
from .sections import is_bundled_deepspeed_config
from .stage_overrides import StageOverride


def _path_keys(cls: type) -> list[tuple[str, str, bool]]:
    """(section, key, takes a Hub ID) of every path setting of `cls`, from the fields' metadata."""
    out = []
    for dotted, f in settings(cls):
        kind = rules_of(f).path
        if kind is not None:
            section, _, key = dotted.rpartition(".")
            out.append((section, key, kind is PathKind.HUB))
    return out


PATH_KEYS = _path_keys(Recipe)                 # output_dir is a top-level key: section ""
STAGE_PATH_KEYS = _path_keys(StageOverride)    # what stages.<name> may set among them


def _takes_hub_id(section: str, key: str, hub: bool, node: dict) -> bool:
    # format=datasets reads data.corpus as a dataset: a local folder or a Hub name
    return hub or (section, key) == ("data", "corpus") and node.get("format") == "datasets"


def _anchored(value: str, base: Path, hub: bool) -> str:
    raw = os.path.expanduser(value)
    if raw == "" or os.path.isabs(raw):
        return raw  # an empty value is refused by validation, naming the key
    here = base / raw
    if hub and not here.exists() and looks_like_hub_id(raw):
        return raw
    return str(here.resolve())


def _anchor_section(node, pairs, base: Path) -> None:
    if not isinstance(node, dict):
        return  # a mistyped section: validation names it
    for section, key, hub in pairs:
        holder = node if section == "" else node.get(section)
        if not isinstance(holder, dict) or not isinstance(holder.get(key), str):
            continue
        if (section, key) == ("deepspeed", "config") and is_bundled_deepspeed_config(holder[key]):
            continue
        holder[key] = _anchored(holder[key], base, _takes_hub_id(section, key, hub, holder))


def anchor(values: dict, base: Path) -> dict:
    """The recipe file's values with every relative path key joined to `base` (the recipe's folder)."""
    _anchor_section(values, PATH_KEYS, base)
    stages = values.get("stages")
    if isinstance(stages, dict):
        for override in stages.values():
            _anchor_section(override, STAGE_PATH_KEYS, base)
    return values

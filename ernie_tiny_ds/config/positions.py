"""Sequence lengths against the positions of every model whose config can be read at load."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError


def _usable_positions(config: Any) -> Optional[int]:
    """The longest sequence a model config takes: max_position_embeddings, less RoBERTa's offset
    (its position ids start after the padding id). None when the config does not say."""
    if not isinstance(config, dict):
        return None
    positions = config.get("max_position_embeddings", 512)  # the BERT-family default
    if not isinstance(positions, int) or isinstance(positions, bool):
        return None
    if config.get("model_type") in ("roberta", "xlm-roberta"):
        pad = config.get("pad_token_id", 1)
        positions -= (pad if isinstance(pad, int) else 1) + 1
    return positions


def _folder_config(path: Optional[str]) -> Optional[dict]:
    """config.json of a local model folder; None for a Hub ID or an unreadable file (the loader reports
    those, naming the key, when it opens the model)."""
    if not path:
        return None
    try:
        return json.loads((Path(os.path.expanduser(path)) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def check_positions(r, lengths: list[tuple[str, int]]) -> None:
    """Sequence lengths within the positions of every model of recipe `r` whose config can be read
    now, so a mistake stops before any work and not at the first forward of a long job."""
    models = [("teacher.config", r.teacher.config), ("teacher.path", _folder_config(r.teacher.path)),
              ("teacher.finetuned_path", _folder_config(r.teacher.finetuned_path)),
              ("student.path", _folder_config(r.student.path))]
    for model_key, config in models:
        limit = _usable_positions(config)
        for length_key, length in lengths:
            if limit is not None and length > limit:
                raise ConfigError(f"{length_key} ({length}) is longer than the {limit} positions of {model_key}'s "
                                  f"model (max_position_embeddings); set {length_key} to at most {limit}")

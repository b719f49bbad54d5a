"""Nested mappings as dotted keys: recipe fingerprints, tracker parameters, DeepSpeed overrides."""
from __future__ import annotations


def flatten(values: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}. An empty mapping is a value of its own (a key set to {})."""
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out

"""Mappings (YAML, overrides) into typed sections and back: each value checked against its field's
annotation, with an error naming the key (and the closest valid key for a typo)."""
from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union

from ..errors import ConfigError
from .rules import UNSET, join, rules_of


def to_dict(obj: Any) -> Any:
    """Plain data: sections as mappings, without the keys a partial section leaves unset and without
    bookkeeping fields (those are no recipe keys)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if rules_of(f).setting and getattr(obj, f.name) is not UNSET}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_dict(v) for v in obj]
    return copy.deepcopy(obj)


def unknown_key(key: str, name: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{join(key, close[0])}'?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown key '{join(key, name)}'{hint}")


def build(cls: type, values: dict, key: str) -> Any:
    """`cls` from the mapping `values` (the keys it leaves out keep their defaults)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        if name in getattr(cls, "RENAMED_KEYS", {}):
            raise ConfigError(f"{join(key, name)}: renamed to {join(key, cls.RENAMED_KEYS[name])}")
        if name not in fields:
            raise unknown_key(key, str(name), [n for n, f in fields.items() if rules_of(f).setting])
        if not rules_of(fields[name]).setting:
            raise ConfigError(f"unknown key '{join(key, name)}': it is not a recipe setting")
        kwargs[name] = coerce(value, hints[name], join(key, name))
    return cls(**kwargs)


def load_section(cls: type, values: dict, key: str) -> Any:
    """One recipe section (e.g. TaskConfig) from a mapping, with the recipe's key-naming errors."""
    if not isinstance(values, dict):
        raise ConfigError(f"{key}: expected a mapping, got {type(values).__name__} {values!r}")
    return build(cls, values, key)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _mismatch(key: str, expected: str, value: Any, typed: bool = True) -> ConfigError:
    got = f"{type(value).__name__} {value!r}" if typed else repr(value)
    return ConfigError(f"{key}: expected {expected}, got {got}")


def _checked(ok: bool, key: str, expected: str, value: Any, typed: bool = True) -> Any:
    """`value` when `ok`, else the error naming the key, what it expects and what it got."""
    if not ok:
        raise _mismatch(key, expected, value, typed)
    return value


def _coerce_scalar(value: Any, tp: Any, key: str) -> Any:
    if tp is type(None):
        if value is not None:
            raise _mismatch(key, "null", value, typed=False)
        return None
    if tp is bool:
        return _checked(isinstance(value, bool), key, "true or false", value, typed=False)
    if tp is int:
        return _checked(isinstance(value, int) and not isinstance(value, bool), key, "an integer", value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        _checked(isinstance(value, (int, float)) and not isinstance(value, bool), key, "a number", value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    return value


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, _checked(isinstance(value, dict), key, "a mapping", value), key)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return coerce(value, option, key)
            except ConfigError:
                pass
        raise _mismatch(key, _type_name(tp), value)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(c) for c in choices)}")
        return value
    if origin is list:
        _checked(isinstance(value, list), key, _type_name(tp), value)
        (inner,) = typing.get_args(tp)
        return [coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _checked(isinstance(value, dict), key, "a mapping", value)
        args = typing.get_args(tp)
        if args:  # the values' type (a section, a number, ...); the keys are names
            return {k: coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
        return value
    return _coerce_scalar(value, tp, key)

"""A recipe field's own rules, declared where the field is: `setting(default, bounds=..., safe_on=...,
path=...)`.

Validation (bounds, finite floats, empty paths), path anchoring (config/paths.py) and what a resumed
or skipped run may change (runtime/recipe_changes.py) read them back from the dataclass metadata,
so no rule lists a field name a second time.
"""
from __future__ import annotations

import dataclasses
import enum
import math
import typing
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from ..errors import ConfigError

_RULES = "ernie_tiny_ds.rules"  # the metadata key


class Unset:
    """The value of a key a partial section (a stage's override) leaves to the recipe."""

    def __repr__(self) -> str:
        return "unset"


UNSET = Unset()


class SafeOn(enum.Flag):
    """When a changed value may be taken on by a run that continues recorded work: the recorded
    recipe is compared with this run's (runtime/recipe_changes.py) and every other change is refused."""
    NEVER = 0
    RESUME = enum.auto()           # a resumed distillation stage, applied from the resumed step on
    FINETUNE_RESUME = enum.auto()  # resumed teacher finetuning
    SKIP = enum.auto()             # a finished stage the pipeline skips: nothing it trained may differ
    RUN = RESUME | FINETUNE_RESUME | SKIP  # how a run works and logs, never what it learns


class PathKind(enum.Enum):
    LOCAL = "a path"
    HUB = "a path or a Hub ID"  # a folder beside the recipe is the folder, else an `owner/name` is the Hub's


@dataclass(frozen=True)
class Bounds:
    """The numbers a field accepts; None (an unset Optional) always passes."""
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    noun: str = ""  # what the message calls an accepted value ("a fraction")

    def describe(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        if isinstance(self.low, int) and isinstance(self.high, int) and not (self.low_open or self.high_open):
            span = f"{self.low}..{self.high}"
        else:
            span = f"{'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        return f"{self.noun + ' ' if self.noun else ''}in {span}"

    def check(self, value: Any, key: str) -> None:
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            return
        # `not >` also refuses NaN, which every comparison answers False
        low_ok = self.low is None or (value > self.low if self.low_open else value >= self.low)
        high_ok = self.high is None or (value < self.high if self.high_open else value <= self.high)
        if not (low_ok and high_ok):
            raise ConfigError(f"{key} must be {self.describe()}, got {value}")


POSITIVE = Bounds(low=0, low_open=True)
NON_NEGATIVE = Bounds(low=0)


def within(low: float, high: float, *, low_open: bool = False, high_open: bool = False, noun: str = "") -> Bounds:
    return Bounds(low, high, low_open, high_open, noun)


@dataclass(frozen=True)
class Rules:
    bounds: Optional[Bounds] = None
    safe_on: SafeOn = SafeOn.NEVER
    applied: str = ""                  # how a resumed run takes on a change (printed with the warning)
    path: Optional[PathKind] = None    # a path key: anchored to the recipe's folder, refused when empty
    setting: bool = True               # False: bookkeeping on the dataclass, never a recipe key


def setting(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, bounds: Optional[Bounds] = None,
            safe_on: SafeOn = SafeOn.NEVER, applied: str = "", path: Optional[PathKind] = None) -> Any:
    """A dataclass field that carries its rules (see the module)."""
    return dataclasses.field(default=default, default_factory=factory,
                             metadata={_RULES: Rules(bounds, safe_on, applied, path)})


def bookkeeping(factory: Any) -> Any:
    """A field the code sets, not the recipe: a recipe that names it is refused."""
    return dataclasses.field(default_factory=factory, metadata={_RULES: Rules(setting=False)})


def rules_of(f: dataclasses.Field) -> Rules:
    return f.metadata.get(_RULES, Rules())


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def settings(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field]]:
    """Every leaf setting of a schema dataclass (nested sections walked), by dotted key."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not rules_of(f).setting:
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            yield from settings(hints[f.name], join(prefix, f.name))
        else:
            yield join(prefix, f.name), f


def check_finite(value: Any, key: str) -> None:
    """Every float in the recipe must be finite: NaN passes every `<`/`==` range check, and YAML
    reads .nan/.inf (and the strings nan/inf) as floats, so check them all, naming the key."""
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            check_finite(getattr(value, f.name), join(key, f.name))
    elif isinstance(value, dict):
        for k, v in value.items():
            check_finite(v, join(key, str(k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_finite(v, f"{key}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value}")


def check_value(value: Any, rules: Rules, key: str) -> None:
    check_finite(value, key)
    if rules.bounds is not None:
        rules.bounds.check(value, key)
    if rules.path is not None and isinstance(value, str) and not value.strip():
        raise ConfigError(f"{key} is empty: give {rules.path.value}, or leave the key out")


def check_tree(obj: Any, key: str = "") -> None:
    """Each field of `obj` (and of its nested sections) against its own rules, then each section's
    cross-field `check()`, innermost first. Unset fields (of a partial section) are not checked."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if value is UNSET:
            continue
        if dataclasses.is_dataclass(value):
            check_tree(value, join(key, f.name))
        else:
            check_value(value, rules_of(f), join(key, f.name))
    check = getattr(obj, "check", None)
    if check is not None:
        check()

"""`stages.<name>`: what one stage changes, as typed partial sections.

A partial section has the fields of its section, with the same types and rules, each unset unless
the recipe gives it: a typo or a wrong type is refused at load, naming `stages.<name>.<section>.<key>`.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from .convert import to_dict
from .rules import UNSET, check_tree
from .sections import DataConfig, LossConfig, OptimConfig, TrainConfig


def _given_repr(self) -> str:
    given = ", ".join(f"{name}={value!r}" for name, value in to_dict(self).items())
    return f"{type(self).__name__}({given})"


def partial(cls: type) -> type:
    """`cls` with every field unset by default (the field's annotation and metadata kept)."""
    hints = typing.get_type_hints(cls)
    fields = [(f.name, hints[f.name], field(default=UNSET, metadata=f.metadata)) for f in dataclasses.fields(cls)]
    made = dataclasses.make_dataclass(f"Partial{cls.__name__}", fields, repr=False,
                                      namespace={"__repr__": _given_repr,
                                                 "RENAMED_KEYS": getattr(cls, "RENAMED_KEYS", {})})
    made.__module__ = __name__
    return made


PartialTrain = partial(TrainConfig)
PartialOptim = partial(OptimConfig)
PartialLosses = partial(LossConfig)
PartialData = partial(DataConfig)


@dataclass
class StageOverride:
    """The sections a stage may override: its fields are the whole list."""
    train: PartialTrain = field(default_factory=PartialTrain)
    optim: PartialOptim = field(default_factory=PartialOptim)
    losses: PartialLosses = field(default_factory=PartialLosses)
    data: PartialData = field(default_factory=PartialData)

    def given(self) -> dict[str, dict]:
        """section -> the keys this stage sets."""
        return to_dict(self)

    def check_keys(self, key: str) -> None:
        """Each given key against its field's rules (the cross-field checks run on the merged recipe)."""
        check_tree(self, key)


STAGE_SECTIONS = tuple(f.name for f in dataclasses.fields(StageOverride))

"""Typed recipe: dataclasses loaded from YAML, `key.sub=value` overrides, validation with clear errors.

A recipe is one YAML file. Every section is a dataclass (sections.py) whose fields carry their own
rules (rules.py); unknown keys, wrong types and bad values raise ConfigError naming the key (and the
closest valid key for a typo). Reading: loading.py, overrides.py, convert.py; stages.<name>:
stage_overrides.py.
"""
from ..stages import STAGES
from .convert import load_section, to_dict
from .loading import load_recipe
from .overrides import apply_overrides
from .recipe import Recipe, from_dict
from .sections import DataConfig, DeepSpeedSection, LossConfig, StudentConfig, TaskConfig, TeacherConfig

__all__ = ["STAGES", "DataConfig", "DeepSpeedSection", "LossConfig", "Recipe", "StudentConfig", "TaskConfig",
           "TeacherConfig", "apply_overrides", "from_dict", "load_recipe", "load_section", "to_dict"]

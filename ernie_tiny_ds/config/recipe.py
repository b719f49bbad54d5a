"""The whole recipe: its sections, its stages' overrides, and the checks that span sections."""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..stages import STAGE_SPECS  # the stage names, defined once beside what each stage is
from .convert import build, to_dict
from .overrides import apply_overrides, parse_override
from .positions import check_positions
from .rules import PathKind, bookkeeping, check_tree, join, setting
from .sections import (
    STUDENT_NAME,
    AugmentConfig,
    DataConfig,
    DeepSpeedSection,
    FinetuneConfig,
    LossConfig,
    OptimConfig,
    ReleaseConfig,
    StudentConfig,
    StudentShape,
    TaskConfig,
    TeacherConfig,
    TrainConfig,
    is_bundled_deepspeed_config,
)
from .stage_overrides import STAGE_SECTIONS, StageOverride

# the keys whose `auto` depends on the device a run trains on (resolved by runtime/device_defaults.py)
AUTO_KEYS = ("train.precision", "data.num_workers")


@dataclass
class Recipe:
    output_dir: str = setting("runs/ernie-tiny", path=PathKind.LOCAL)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    losses: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    release: ReleaseConfig = field(default_factory=ReleaseConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    stages: dict[str, StageOverride] = field(default_factory=dict)
    # several students from one teacher pass: the general-corpus stages train them all together
    # (runtime/shared_teacher.py), the task stages one at a time, each in OUT/<name>/
    students: list[StudentShape] = field(default_factory=list)
    # set by load_recipe: the command-line overrides of the sections a stage can override, so that
    # for_stage lets them win over the recipe file's stages.<name> too
    command_line: list[str] = bookkeeping(list)
    # set by the run once it knows its device (runtime/device_defaults.py): what each `auto` key of
    # AUTO_KEYS means there; for_stage applies it too, so a stage's fingerprint records what it ran with
    device_defaults: dict = bookkeeping(dict)

    def for_stage(self, stage: str) -> "Recipe":
        """This recipe with the stage's overrides applied (validated like the rest).

        Precedence, lowest first: the recipe's sections, its stages.<stage>, the command line's
        section keys (train.max_steps=20 shortens every stage), the command line's stages.<stage>."""
        if stage not in STAGE_SPECS:  # read now, not at import: a stage registered later counts
            raise ConfigError(f"unknown stage {stage!r}: choose one of {', '.join(STAGE_SPECS)}")
        merged = to_dict(self)
        override = self.stages.get(stage)
        if override is not None:
            for section, values in override.given().items():
                for key, value in values.items():  # a mapping (losses.weights) merges name by name
                    old = merged[section].get(key)
                    merged[section][key] = {**old, **value} if isinstance(old, dict) and isinstance(value, dict) \
                        else value
        general, this_stage = [], []
        for text in self.command_line:
            path, _ = parse_override(text)
            if path[0] in STAGE_SECTIONS:
                general.append(text)
            elif path[:2] == ["stages", stage] and len(path) > 3:
                this_stage.append(text.split(".", 2)[2])  # stages.<stage>.train.x=v -> train.x=v
        merged = apply_overrides(merged, general + this_stage)
        merged["stages"] = {}
        out = from_dict(merged, source=f"stages.{stage}")
        if STAGE_SPECS[stage].data == "general":  # the commands that never read the corpus never check its length
            check_positions(out, [("data.max_seq_len", out.data.max_seq_len)])
        out.stages = self.stages
        out.command_line = self.command_line
        return out.on_device(self.device_defaults) if self.device_defaults else out

    def on_device(self, defaults: dict) -> "Recipe":
        """This recipe with each AUTO_KEYS key still `auto` set to its value in `defaults` (dotted key ->
        value); keys given a value keep it."""
        out = dataclasses.replace(self)
        for key in AUTO_KEYS:
            section, name = key.split(".")
            part = getattr(out, section)
            if getattr(part, name) == "auto":
                setattr(out, section, dataclasses.replace(part, **{name: defaults[key]}))
        out.device_defaults = dict(defaults)
        return out

    def check(self) -> None:
        """What spans sections; check_tree has checked each section by then."""
        for stage, override in self.stages.items():
            if stage not in STAGE_SPECS:
                close = difflib.get_close_matches(stage, list(STAGE_SPECS), n=1)
                hint = f"; did you mean 'stages.{close[0]}'?" if close else f"; stages are {', '.join(STAGE_SPECS)}"
                raise ConfigError(f"unknown key 'stages.{stage}'{hint}")
            override.check_keys(f"stages.{stage}")
        if self.task.name or self.task.train_file or self.task.dataset:  # no task: task.max_seq_len is never used
            check_positions(self, [("task.max_seq_len", self.task.max_seq_len)])
        if self.deepspeed.overrides or not is_bundled_deepspeed_config(self.deepspeed.config):
            from ..runtime.ds_validation import check_ds_config  # imports DeepSpeed: only when there is something
            check_ds_config(self)
        for stage in self.stages:  # each stage's recipe must itself be valid
            self.for_stage(stage)
        self.check_students()

    def check_students(self) -> None:
        """`students:` names one folder each under output_dir, and each shape is a valid student section."""
        if self.students and self.student.path is not None:  # a loaded student has its folder's shape, not these
            raise ConfigError("students: student.path would start every student from one folder; leave it out "
                              "(each student starts fresh, then from its own previous stage)")
        reserved = {*STAGE_SPECS, "teacher_finetuned", "teacher_finetuned_best"}
        seen: set[str] = set()
        for i, shape in enumerate(self.students):
            key = f"students[{i}]"
            if shape.name is None:
                raise ConfigError(f"{key}.name: give each student a name (its folder under output_dir)")
            if not STUDENT_NAME.fullmatch(shape.name) or shape.name in reserved:
                raise ConfigError(f"{key}.name: {shape.name!r} cannot name a folder under output_dir (letters, "
                                  f"digits, '_', '.', '-'; not a stage's or the teacher's folder)")
            if shape.name in seen:
                raise ConfigError(f"{key}.name: {shape.name!r} names two students; each needs its own name")
            seen.add(shape.name)
            check_tree(shape, key)
            merged = shape.shaped(self.student)
            if merged.hidden_size % merged.num_attention_heads:
                raise ConfigError(f"{join(key, 'hidden_size')} ({merged.hidden_size}) must be divisible by "
                                  f"{join(key, 'num_attention_heads')} ({merged.num_attention_heads})")

    def for_student(self, name: str) -> "Recipe":
        """One student of `students:` as a single-student recipe: its shape in `student:`, no `students:`,
        the same output_dir (the caller places its folders). Its stage fingerprints equal a solo run's."""
        (shape,) = [s for s in self.students if s.name == name]
        return dataclasses.replace(self, student=shape.shaped(self.student), students=[])


def from_dict(values: dict, source: str = "recipe") -> Recipe:
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: a recipe must be a mapping of sections, got {type(values).__name__}")
    recipe = build(Recipe, values, "")
    check_tree(recipe)  # each field's rules, each section's check(), then Recipe.check(); files: where used
    return recipe

"""The four stages of ERNIE-Tiny: which teacher, which data, which losses."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    name: str
    title: str
    finetuned_teacher: bool  # False: the pretrained teacher
    data: str                # "general" corpus or "task" data
    labels: bool             # soft-label + hard-label terms (student gets a task head)

    @property
    def augmented_data(self) -> bool:
        """Task stages train on task.augmented_train_file when it is set (teacher finetuning never does)."""
        return self.data == "task"


STAGE_SPECS = {
    "general": StageSpec("general", "General Distillation", False, "general", False),
    "general_enhanced": StageSpec("general_enhanced", "General-Enhanced Distillation", True, "general", False),
    "task_adaptive": StageSpec("task_adaptive", "Task-Adaptive Distillation", True, "task", False),
    "task_specific": StageSpec("task_specific", "Task-Specific Distillation", True, "task", True),
}

STAGES = tuple(STAGE_SPECS)  # in pipeline order

"""The four stages of ERNIE-Tiny as data: which teacher, which data, what the loss terms may read, and
what each stage's student is for. A new stage is one entry of STAGE_SPECS; the pipeline runs them in order.

A stage does not list its loss terms: it trains on every term of distill/loss_terms.py that reads nothing
but what its forward gives (`reads`, the NEEDS of that module), so a new term is one entry there and
joins every stage that can feed it (a test checks that a stage reading logits gives its student a task
head and runs the whole teacher).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

# what a stage's forward gives the loss terms: the captured features (hidden states, Q/K) of both models;
# with the task head, the task logits of both and the gold labels as well
FEATURES = frozenset({"features"})
FEATURES_LOGITS_LABELS = frozenset({"features", "logits", "labels"})


@dataclass(frozen=True)
class StageSpec:
    name: str
    title: str
    finetuned_teacher: bool  # False: the pretrained teacher
    data: Literal["general", "task"]  # the general corpus or the task's data
    reads: frozenset[str]    # what its loss terms may read: it trains on every registered term that fits
    task_head: bool = False  # the student gets the task's classification head (and the loader the labels)
    # how deep the teacher runs: "mapped_layers" stops at the deepest layer the layer map reads (no
    # logits); "logits" runs the whole model, its head included
    teacher_depth: Literal["mapped_layers", "logits"] = "mapped_layers"
    # checkpoint selection with train.eval_every: "task_metric" keeps the best student by the task's
    # main metric beside the last; None: the stage selects nothing
    selects_on: Optional[Literal["task_metric"]] = None
    ships: bool = False      # its student is the product: the report scores it, the pipeline names it

    @property
    def augmented_data(self) -> bool:
        """Task stages train on task.augmented_train_file when it is set (teacher finetuning never does)."""
        return self.data == "task"


STAGE_SPECS = {spec.name: spec for spec in (
    StageSpec("general", "General Distillation", False, "general", FEATURES),
    StageSpec("general_enhanced", "General-Enhanced Distillation", True, "general", FEATURES),
    StageSpec("task_adaptive", "Task-Adaptive Distillation", True, "task", FEATURES),
    StageSpec("task_specific", "Task-Specific Distillation", True, "task", FEATURES_LOGITS_LABELS,
              task_head=True, teacher_depth="logits", selects_on="task_metric", ships=True),
)}

STAGES = tuple(STAGE_SPECS)  # in pipeline order


def shipping_stage() -> StageSpec:
    """The stage whose student is the product (read at call time, so a registered stage counts)."""
    shipping = [spec for spec in STAGE_SPECS.values() if spec.ships]
    if len(shipping) != 1:
        raise RuntimeError(f"exactly one stage ships its student, found {[s.name for s in shipping]}")
    return shipping[0]

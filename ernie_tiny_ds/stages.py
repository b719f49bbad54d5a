"""The four stages of ERNIE-Tiny as data: which teacher, which data, which loss terms, and what each
stage's student is for. A new stage is one entry of STAGE_SPECS; the pipeline runs them in order.

The loss-term names are those of distill/loss_terms.py (a test checks each is registered and that
a stage whose terms read logits gives its student a task head and runs the whole teacher).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

LATENT_TERMS = ("embedding", "hidden", "attention")
LABEL_TERMS = ("soft_label", "hard_label")


@dataclass(frozen=True)
class StageSpec:
    name: str
    title: str
    finetuned_teacher: bool  # False: the pretrained teacher
    data: Literal["general", "task"]  # the general corpus or the task's data
    terms: tuple[str, ...]   # the loss terms it trains on, by registered name
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
    StageSpec("general", "General Distillation", False, "general", LATENT_TERMS),
    StageSpec("general_enhanced", "General-Enhanced Distillation", True, "general", LATENT_TERMS),
    StageSpec("task_adaptive", "Task-Adaptive Distillation", True, "task", LATENT_TERMS),
    StageSpec("task_specific", "Task-Specific Distillation", True, "task", LATENT_TERMS + LABEL_TERMS,
              task_head=True, teacher_depth="logits", selects_on="task_metric", ships=True),
)}

STAGES = tuple(STAGE_SPECS)  # in pipeline order


def shipping_stage() -> StageSpec:
    """The stage whose student is the product (read at call time, so a registered stage counts)."""
    shipping = [spec for spec in STAGE_SPECS.values() if spec.ships]
    if len(shipping) != 1:
        raise RuntimeError(f"exactly one stage ships its student, found {[s.name for s in shipping]}")
    return shipping[0]

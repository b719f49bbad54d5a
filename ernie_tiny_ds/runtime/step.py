"""One training step, the same for every job: the distillation stages and teacher finetuning
(through runtime/trainer.py's loop) and bench/step.py (which times it bare).

    teacher forward with capture (when the parts have a teacher)
    -> the objective's forward through the DeepSpeed engine: (total, terms)
    -> finite check, agreed over all ranks (control plane)
    -> backward, optimizer step

A step whose loss is not finite on some rank is skipped on every rank (no backward, no step);
the caller decides what a skip means (count it, or stop).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..distill.models import FeatureCapture
from ..distill.objective import TeacherOutput
from .collectives import all_reduce_values


@dataclass
class StepParts:
    """What train_step needs: the engine over an objective whose forward is
    (input_ids, attention_mask, token_type_ids, teacher, labels) -> (total, terms); a frozen
    teacher and its capture hooks when the objective learns from one. StageParts has the same fields."""
    engine: object
    teacher: torch.nn.Module | None = None
    teacher_capture: FeatureCapture | None = None


@dataclass
class StepResult:
    total: torch.Tensor                # detached loss of this rank's micro-batch
    terms: dict[str, torch.Tensor]     # detached loss terms
    tokens: int                        # non-padding tokens of this rank's micro-batch
    finite: bool                       # no rank saw a NaN/inf loss (agreed by all ranks)
    boundary: bool                     # the optimizer stepped (end of gradient accumulation)
    lr: float                          # the learning rate this step used


def teacher_forward(teacher, capture: FeatureCapture, batch: dict) -> TeacherOutput:
    with torch.no_grad(), capture.recording() as features:
        out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      token_type_ids=batch["token_type_ids"])
    return TeacherOutput(features, getattr(out, "logits", None))


def all_ranks_finite(total: torch.Tensor) -> bool:
    """True on every rank when no rank's loss is NaN or inf (a control-plane collective over the
    process group)."""
    (flag,) = all_reduce_values([1.0 if torch.isfinite(total).item() else 0.0], "min")
    return bool(flag)


def _no_mark(_phase: str) -> None:
    pass


def train_step(parts, batch: dict, mark: Callable[[str], None] = _no_mark) -> StepResult:
    """One micro-batch (already on the device). Collective: every rank calls it. `mark(phase)` is
    called at the end of each phase (bench/step.py times them)."""
    engine = parts.engine
    teacher = getattr(parts, "teacher", None)
    teacher_out = teacher_forward(teacher, parts.teacher_capture, batch) if teacher is not None else None
    mark("teacher forward")
    total, terms = engine(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], teacher_out,
                          batch.get("labels"))
    mark("student forward + loss")
    tokens = int(batch["attention_mask"].sum())
    lr = engine.get_lr()[0]  # the rate this step uses (read before step() advances the schedule)
    if not all_ranks_finite(total):
        return StepResult(total.detach(), terms, tokens, finite=False, boundary=False, lr=lr)
    boundary = engine.is_gradient_accumulation_boundary()
    engine.backward(total)
    mark("backward")
    engine.step()
    mark("optimizer")
    return StepResult(total.detach(), terms, tokens, finite=True, boundary=boundary, lr=lr)

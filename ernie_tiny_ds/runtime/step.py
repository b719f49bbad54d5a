"""One training step, the same for every job: the distillation stages and teacher finetuning
(through runtime/trainer.py's loop) and bench/step.py (which times it bare).

    teacher forward with capture (when the parts have a teacher)
    -> the objective's forward through the DeepSpeed engine: (total, terms)
    -> its finiteness folded into the optimizer step's flag, on the device
    -> mid-accumulation: backward, and the engine counts the micro-batch
    -> at the accumulation boundary: the flag agreed over all ranks (the step's one host read and
       one control-plane collective), then backward and the optimizer step

A non-finite loss on any rank skips the whole optimizer step on every rank: the boundary
micro-batch never reaches backward, and the gradients the step's earlier micro-batches accumulated
are dropped (discard_window). So no rank ever steps on a NaN, and no micro-batch waits on the host
before its backward except the boundary one. The caller decides what a skip means (count it, or stop).
"""
from __future__ import annotations

from dataclasses import dataclass, field
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
class Window:
    """The micro-batches of one optimizer step, as seen so far on this rank. Device tensors: nothing
    here is read on the host before the boundary."""
    bad: torch.Tensor | None = None                             # a non-finite loss among them
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # loss terms summed over them (NaN names the term)
    accumulated: int = 0                                          # micro-batches whose gradients were accumulated

    def add(self, total: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        flag = ~torch.isfinite(total.detach())
        self.bad = flag if self.bad is None else self.bad | flag
        for name, value in terms.items():
            self.terms[name] = value.detach() + self.terms[name] if name in self.terms else value.detach()

    def agreed_finite(self) -> bool:
        """True on every rank when no rank's window holds a non-finite loss (the one host read of the
        step, then a control-plane collective)."""
        local = float(self.bad)
        (flag,) = all_reduce_values([local], "max")
        return not flag

    def reset(self) -> None:
        """The optimizer step ended (taken or skipped): the next micro-batch starts a new window."""
        self.bad, self.terms, self.accumulated = None, {}, 0


@dataclass
class StepResult:
    total: torch.Tensor                # detached loss of this rank's micro-batch
    terms: dict[str, torch.Tensor]     # detached loss terms (on a skip: summed over the step's micro-batches)
    tokens: torch.Tensor               # non-padding tokens of this rank's micro-batch (on the device)
    finite: bool                       # at a boundary: no rank saw a NaN/inf loss in the step (agreed by all ranks)
    boundary: bool                     # the end of an optimizer step (taken, or skipped when not finite)
    lr: float                          # the learning rate this step used


def teacher_forward(teacher, capture: FeatureCapture, batch: dict) -> TeacherOutput:
    with torch.no_grad(), capture.recording() as features:
        out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      token_type_ids=batch["token_type_ids"])
    return TeacherOutput(features, getattr(out, "logits", None))


def discard_window(engine) -> None:
    """End an optimizer step without stepping: drop the gradients its micro-batches accumulated, as
    DeepSpeed drops those of a step it skips for overflow, and count the boundary micro-batch so
    that the next step accumulates a whole window."""
    optimizer = engine.optimizer
    optimizer.zero_grad(set_to_none=True)
    for buffers in ("averaged_gradients", "all_grad_tensors"):  # ZeRO-1/2's reduced partitions
        for key in getattr(optimizer, buffers, {}):
            getattr(optimizer, buffers)[key] = None
    if hasattr(optimizer, "clear_hp_grads"):  # DeepSpeed's bf16 optimizer keeps fp32 gradient copies
        optimizer.clear_hp_grads()
    for param in engine.module.parameters():
        param.grad = None
    engine.micro_steps += 1


def _no_mark(_phase: str) -> None:
    pass


def train_step(parts, batch: dict, mark: Callable[[str], None] = _no_mark, window: Window | None = None) -> StepResult:
    """One micro-batch (already on the device). `window`: the optimizer step's micro-batches so far
    (the trainer keeps one across calls; none: this micro-batch is a step of its own, as with
    train.grad_accum 1). Collective at a boundary: every rank calls it. `mark(phase)` is called at the
    end of each phase (bench/step.py times them)."""
    teacher = getattr(parts, "teacher", None)
    teacher_out = teacher_forward(teacher, parts.teacher_capture, batch) if teacher is not None else None
    mark("teacher forward")
    return student_step(parts.engine, batch, teacher_out, mark, window)


def student_step(engine, batch: dict, teacher_out: TeacherOutput | None, mark: Callable[[str], None] = _no_mark,
                 window: Window | None = None) -> StepResult:
    """train_step after the teacher's forward: the student's forward, loss, backward and optimizer step
    on `teacher_out` (runtime/shared_teacher.py runs it for each student on one teacher forward)."""
    window = Window() if window is None else window
    total, terms = engine(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], teacher_out,
                          batch.get("labels"))
    mark("student forward + loss")
    tokens = batch["attention_mask"].sum()
    lr = engine.get_lr()[0]  # the rate this step uses (read before step() advances the schedule)
    window.add(total, terms)
    boundary = engine.is_gradient_accumulation_boundary()
    if boundary and not window.agreed_finite():
        if window.accumulated:
            discard_window(engine)
        skipped = StepResult(total.detach(), dict(window.terms), tokens, finite=False, boundary=True, lr=lr)
        window.reset()
        return skipped
    engine.backward(total)
    mark("backward")
    engine.step()
    mark("optimizer")
    window.accumulated += 1
    if boundary:
        window.reset()
    return StepResult(total.detach(), terms, tokens, finite=True, boundary=boundary, lr=lr)

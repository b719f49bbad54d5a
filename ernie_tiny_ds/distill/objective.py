"""The trainable side of one stage: the student, its projections to the teacher's width, and the
weighted sum of the stage's loss terms (distill/loss_terms.py: what each computes and reads). DeepSpeed
wraps this module, so its forward is the step.

The projections W_h, W_e are part of the student's training state, not of the exported model: each
stage writes them beside its export (OUT/<stage>/projections.safetensors) and the next stage starts
from them when the teacher's width is the same (losses.carry_projections), as TinyBERT's fit_dense
lives across its stages.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .. import losses as losses_ref  # the torch reference (L means sequence length here)
from ..config import LossConfig
from ..errors import ConfigError
from . import loss_terms
from .models import FeatureCapture, Features

PROJECTIONS = ("hidden_proj", "embedding_proj")
PROJECTIONS_FILE = "projections.safetensors"  # beside a stage's student/ folder


def projection_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The projection weights of an objective's (or a checkpoint's consolidated) state dict."""
    return {k: v for k, v in state.items() if k.split(".", 1)[0] in PROJECTIONS}


def projections_fingerprint(state: dict[str, torch.Tensor]) -> float:
    """Sum of |w| over the projections: stage_done.json records the one a stage started from."""
    return float(sum(v.detach().double().abs().sum() for v in projection_state(state).values()))


def read_projections(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def projections_source(student_path: str | None, projections: str | None) -> Path | None:
    """Which projections a stage starts from: student.projections when set (the pipeline passes the
    previous stage's), else the file beside the folder of student.path (OUT/<stage>/student ->
    OUT/<stage>/projections.safetensors), else none."""
    if projections is not None:
        if not Path(projections).is_file():
            raise ConfigError(f"student.projections: file not found: {projections}")
        return Path(projections)
    if student_path is not None:
        beside = Path(student_path).parent / PROJECTIONS_FILE
        if beside.is_file():
            return beside
    return None


def start_projections(objective: "DistillationObjective", student_path: str | None, projections: str | None,
                      carry: bool) -> dict:
    """Load the carried projections into a fresh objective (before the engine wraps it); returns
    what stage_done.json records about them."""
    source = projections_source(student_path, projections) if carry else None
    why = None
    if source is not None:
        why = objective.load_projections(read_projections(source))
        if why is not None:
            print(f"projections: not carried from {source}: {why}; they start fresh", flush=True)
    return {"projections_init": str(source) if source is not None and why is None else "fresh",
            "projections_init_fingerprint": projections_fingerprint(objective.state_dict())}


@dataclass
class TeacherOutput:
    features: Features
    logits: torch.Tensor | None = None


class DistillationObjective(nn.Module):
    def __init__(self, student: nn.Module, teacher_hidden_size: int, mapping: list[int], cfg: LossConfig,
                 terms: tuple[str, ...]):
        super().__init__()
        self.student = student
        student_hidden = student.config.hidden_size
        self.hidden_proj = nn.Linear(student_hidden, teacher_hidden_size)
        self.embedding_proj = nn.Linear(student_hidden, teacher_hidden_size)
        self.mapping = list(mapping)  # mapping[i-1] = teacher layer of student layer i
        self.cfg = cfg
        self.terms = tuple(terms)     # the stage's loss terms, by registered name
        loss_terms.term_weights(self.terms, cfg.weights)  # an unregistered name fails here, not at the first step
        self.capture = FeatureCapture(student)

    def load_projections(self, saved: dict[str, torch.Tensor]) -> str | None:
        """Start the projections from `saved`; None when done, else why they stay fresh (other widths)."""
        mine = projection_state(self.state_dict())
        saved = projection_state(saved)
        if set(saved) != set(mine):
            return f"it holds {', '.join(sorted(saved)) or 'no projections'}, not {', '.join(sorted(mine))}"
        for key, value in saved.items():
            if value.shape != mine[key].shape:
                return (f"{key} maps {value.shape[1]} -> {value.shape[0]}, this stage needs "
                        f"{mine[key].shape[1]} -> {mine[key].shape[0]} (another teacher or student width)")
        with torch.no_grad():
            for name in PROJECTIONS:
                module = getattr(self, name)
                module.weight.copy_(saved[f"{name}.weight"])
                module.bias.copy_(saved[f"{name}.bias"])
        return None

    def weights(self) -> dict[str, float]:
        """The stage's terms that count (weight > 0), in the stage's order, with their weights."""
        return {k: v for k, v in loss_terms.term_weights(self.terms, self.cfg.weights).items() if v > 0}

    def forward(self, input_ids, attention_mask, token_type_ids, teacher: TeacherOutput, labels=None):
        with self.capture.recording() as student:
            out = self.student(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        inputs = loss_terms.TermInputs(self, student, teacher.features, attention_mask,
                                       getattr(out, "logits", None), teacher.logits, labels)
        weights = self.weights()
        terms = {name: loss_terms.compute_term(name, inputs) for name in weights}
        total = sum(weights[name] * value for name, value in terms.items())
        return total, {name: value.detach() for name, value in terms.items()}


class ClassifierObjective(nn.Module):
    """Teacher finetuning as an objective of the same shape as DistillationObjective, so the same
    train_step runs it: the hard-label loss of a sequence classifier (cross-entropy, or MSE for one
    output), in fp32 whatever the training precision. No teacher: `teacher` is ignored."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, input_ids, attention_mask, token_type_ids, teacher=None, labels=None):
        if labels is None:
            raise ValueError("finetuning needs labels in the batch")
        logits = self.classifier(input_ids=input_ids, attention_mask=attention_mask,
                                 token_type_ids=token_type_ids).logits
        loss = losses_ref.hard_label_loss(logits, labels)
        return loss, {"hard_label": loss.detach()}

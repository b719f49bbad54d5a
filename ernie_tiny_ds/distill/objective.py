"""The trainable side of one stage: the student, its projections to the teacher's width, and the
weighted sum of the stage's loss terms. DeepSpeed wraps this module, so its forward is the step.

Loss terms (TinyBERT-style latent distillation, each with its weight, 0 switches it off):
  embedding  MSE(W_e · student embeddings, teacher embeddings)
  hidden     sum over mapped layers of MSE(W_h · student layer i, teacher layer g(i))
  attention  sum over mapped layers of attention transfer from Q/K (KL or MSE)
  soft_label KL(teacher_T || student_T) · T^2 on task logits   (task_specific stage);
             MSE(student output, teacher output) for a one-output regression head
  hard_label cross-entropy (MSE for regression) with gold labels (task_specific stage)

The projections W_h, W_e are part of the student's training state, not of the exported model: each
stage writes them beside its export (OUT/<stage>/projections.safetensors) and the next stage starts
from them when the teacher's width is the same (losses.carry_projections), as TinyBERT's fit_dense
lives across its stages.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import losses as losses_ref  # the torch reference (L means sequence length here)
from ..config import LossConfig
from ..kernels import dispatch
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
    from safetensors.torch import load_file
    return load_file(str(path))


def projections_source(student_path: str | None, projections: str | None) -> Path | None:
    """Which projections a stage starts from: student.projections when set (the pipeline passes the
    previous stage's), else the file beside the folder of student.path (OUT/<stage>/student ->
    OUT/<stage>/projections.safetensors), else none."""
    from ..errors import ConfigError

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
                 use_labels: bool):
        super().__init__()
        self.student = student
        student_hidden = student.config.hidden_size
        self.hidden_proj = nn.Linear(student_hidden, teacher_hidden_size)
        self.embedding_proj = nn.Linear(student_hidden, teacher_hidden_size)
        self.mapping = list(mapping)  # mapping[i-1] = teacher layer of student layer i
        self.cfg = cfg
        self.use_labels = use_labels
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
        w = {"embedding": self.cfg.embedding_weight, "hidden": self.cfg.hidden_weight,
             "attention": self.cfg.attention_weight}
        if self.use_labels:
            w["soft_label"] = self.cfg.soft_label_weight
            w["hard_label"] = self.cfg.hard_label_weight
        return {k: v for k, v in w.items() if v > 0}

    def forward(self, input_ids, attention_mask, token_type_ids, teacher: TeacherOutput, labels=None):
        with self.capture.recording() as student:
            out = self.student(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        t = teacher.features
        weights = self.weights()
        terms: dict[str, torch.Tensor] = {}
        if "embedding" in weights:
            terms["embedding"] = losses_ref.hidden_mse_loss(self.embedding_proj(student.hidden[0]), t.hidden[0],
                                                            attention_mask)
        if "hidden" in weights:
            terms["hidden"] = sum(
                losses_ref.hidden_mse_loss(self.hidden_proj(student.hidden[i]), t.hidden[g], attention_mask)
                for i, g in enumerate(self.mapping, start=1))
        if "attention" in weights:
            terms["attention"] = sum(
                dispatch.attention_transfer(student.q[i], student.k[i], t.q[g], t.k[g], attention_mask,
                                            kind=self.cfg.attention_kind, relation_heads=self.cfg.relation_heads,
                                            backend=self.cfg.kernels, query_chunk=self.cfg.query_chunk)
                for i, g in enumerate(self.mapping, start=1))
        if "soft_label" in weights and out.logits.shape[-1] == 1:  # regression head: match the outputs
            terms["soft_label"] = losses_ref.regression_soft_label_loss(out.logits, teacher.logits)
        elif "soft_label" in weights:
            terms["soft_label"] = dispatch.soft_label(out.logits, teacher.logits, self.cfg.temperature,
                                                      backend=self.cfg.kernels)
        if "hard_label" in weights:
            if labels is None:
                raise ValueError("the hard-label loss needs labels in the batch")
            terms["hard_label"] = losses_ref.hard_label_loss(out.logits, labels)
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

"""The trainable side of one stage: the student, its projections to the teacher's width, and the
weighted sum of the stage's loss terms. DeepSpeed wraps this module, so its forward is the step.

Loss terms (TinyBERT-style latent distillation, each with its weight, 0 switches it off):
  embedding  MSE(W_e · student embeddings, teacher embeddings)
  hidden     sum over mapped layers of MSE(W_h · student layer i, teacher layer g(i))
  attention  sum over mapped layers of attention transfer from Q/K (KL or MSE)
  soft_label KL(teacher_T || student_T) · T^2 on task logits   (task_specific stage);
             MSE(student output, teacher output) for a one-output regression head
  hard_label cross-entropy (MSE for regression) with gold labels (task_specific stage)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import losses as losses_ref  # the torch reference (L means sequence length here)
from ..config import LossConfig
from ..kernels import dispatch
from .models import Features, FeatureCapture


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

    def weights(self) -> dict[str, float]:
        w = {"embedding": self.cfg.embedding_weight, "hidden": self.cfg.hidden_weight,
             "attention": self.cfg.attention_weight}
        if self.use_labels:
            w["soft_label"] = self.cfg.soft_label_weight
            w["hard_label"] = self.cfg.hard_label_weight
        return {k: v for k, v in w.items() if v > 0}

    def forward(self, input_ids, attention_mask, token_type_ids, teacher: TeacherOutput, labels=None):
        out = self.student(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        student = self.capture.pop()
        t = teacher.features
        weights = self.weights()
        terms: dict[str, torch.Tensor] = {}
        if "embedding" in weights:
            terms["embedding"] = losses_ref.hidden_mse_loss(self.embedding_proj(student.hidden[0]), t.hidden[0], attention_mask)
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

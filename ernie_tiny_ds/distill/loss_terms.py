"""The loss terms a stage can train on, by name: what each computes, what it reads, its default weight.

A new term is one entry of LOSS_TERMS. Every stage whose forward gives what the term reads
(StageSpec.reads, stages.py) trains on it, at its default weight unless `losses.weights.<name>` (or a
stage's `stages.<stage>.losses.weights.<name>`) sets another; 0 switches it off, so a term meant for
one stage only defaults to 0 and that stage's recipe weights it. TinyBERT-style latent distillation:

  embedding  MSE(W_e · student embeddings, teacher embeddings)
  hidden     sum over mapped layers of MSE(W_h · student layer i, teacher layer g(i))
  attention  sum over mapped layers of attention transfer from Q/K (KL or MSE)
  soft_label KL(teacher_T || student_T) · T^2 on task logits;
             MSE(student output, teacher output) for a one-output regression head
  hard_label cross-entropy (MSE for regression) with gold labels
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
from torch import nn

from .. import losses as losses_ref  # the torch reference
from ..errors import ConfigError
from ..kernels import dispatch
from .models import Features

# what a term may read beyond the objective's own modules: the captured features of both models
# (hidden states, Q/K) with the attention mask, the task logits of both, the gold labels
NEEDS = frozenset({"features", "logits", "labels"})


@dataclass
class TermInputs:
    """Everything one forward exposes to the loss terms."""
    objective: nn.Module            # the DistillationObjective: projections, layer map, LossConfig
    student: Features
    teacher: Features
    attention_mask: torch.Tensor
    student_logits: Optional[torch.Tensor] = None  # None: the student has no task head
    teacher_logits: Optional[torch.Tensor] = None  # None: the teacher stops before its head
    labels: Optional[torch.Tensor] = None

    @property
    def layer_pairs(self) -> list[tuple[int, int]]:
        """(student layer i, teacher layer g(i)) for every student layer, 1-based."""
        return list(enumerate(self.objective.mapping, start=1))


@dataclass(frozen=True)
class LossTerm:
    name: str
    compute: Callable[[TermInputs], torch.Tensor]  # a scalar
    needs: frozenset[str]
    default_weight: float = 1.0


def _embedding(x: TermInputs) -> torch.Tensor:
    return losses_ref.hidden_mse_loss(x.objective.embedding_proj(x.student.hidden[0]), x.teacher.hidden[0],
                                      x.attention_mask)


def _hidden(x: TermInputs) -> torch.Tensor:
    project = x.objective.hidden_proj
    return sum(losses_ref.hidden_mse_loss(project(x.student.hidden[i]), x.teacher.hidden[g], x.attention_mask)
               for i, g in x.layer_pairs)


def _attention(x: TermInputs) -> torch.Tensor:
    cfg = x.objective.cfg
    s, t = x.student, x.teacher
    return sum(dispatch.attention_transfer(s.q[i], s.k[i], t.q[g], t.k[g], x.attention_mask, kind=cfg.attention_kind,
                                           relation_heads=cfg.relation_heads, backend=cfg.kernels,
                                           query_chunk=cfg.query_chunk)
               for i, g in x.layer_pairs)


def _soft_label(x: TermInputs) -> torch.Tensor:
    if x.student_logits.shape[-1] == 1:  # regression head: a softmax over one output is constant
        return losses_ref.regression_soft_label_loss(x.student_logits, x.teacher_logits)
    cfg = x.objective.cfg
    return dispatch.soft_label(x.student_logits, x.teacher_logits, cfg.temperature, backend=cfg.kernels)


def _hard_label(x: TermInputs) -> torch.Tensor:
    return losses_ref.hard_label_loss(x.student_logits, x.labels)


LOSS_TERMS: dict[str, LossTerm] = {term.name: term for term in (
    LossTerm("embedding", _embedding, frozenset({"features"})),
    LossTerm("hidden", _hidden, frozenset({"features"})),
    LossTerm("attention", _attention, frozenset({"features"})),
    LossTerm("soft_label", _soft_label, frozenset({"logits"})),
    LossTerm("hard_label", _hard_label, frozenset({"logits", "labels"})),
)}


def check_weight_names(weights: Mapping[str, float], key: str = "losses.weights") -> None:
    """Every weighted name is a registered term; one line with the closest name otherwise."""
    for name in weights:
        if name not in LOSS_TERMS:
            close = difflib.get_close_matches(str(name), list(LOSS_TERMS), n=1, cutoff=0.5)
            hint = f"; did you mean '{key}.{close[0]}'?" if close else f"; loss terms are {', '.join(LOSS_TERMS)}"
            raise ConfigError(f"unknown loss term '{key}.{name}'{hint}")


def stage_terms(spec) -> tuple[str, ...]:
    """The terms stage `spec` trains on: every registered term that reads nothing beyond spec.reads, in
    registration order (the order the total adds them in). Read at call time: a registered term counts."""
    return tuple(name for name, term in LOSS_TERMS.items() if term.needs <= spec.reads)


def term_weights(names: tuple[str, ...] | list[str], configured: Mapping[str, float]) -> dict[str, float]:
    """The weight of each named term: the recipe's when it sets one, else the term's default."""
    unknown = [name for name in names if name not in LOSS_TERMS]
    if unknown:
        raise ValueError(f"unregistered loss terms {unknown}: the registered ones are {', '.join(LOSS_TERMS)}")
    return {name: float(configured.get(name, LOSS_TERMS[name].default_weight)) for name in names}


def terms_need(names: tuple[str, ...] | list[str], what: str) -> bool:
    """Whether any of the named terms reads `what` (one of NEEDS)."""
    if what not in NEEDS:
        raise ValueError(f"unknown need {what!r}: one of {sorted(NEEDS)}")
    return any(what in LOSS_TERMS[name].needs for name in names)


def compute_term(name: str, inputs: TermInputs) -> torch.Tensor:
    """The value of one term, after checking that this forward has what it reads."""
    term = LOSS_TERMS[name]
    if "logits" in term.needs and (inputs.student_logits is None or inputs.teacher_logits is None):
        missing = "the student has no task head" if inputs.student_logits is None else "the teacher gave no logits"
        raise ValueError(f"the {name} loss term needs task logits, but {missing} (a stage with this term needs "
                         "task_head=True and teacher_depth='logits')")
    if "labels" in term.needs and inputs.labels is None:
        raise ValueError(f"the {name} loss term needs labels in the batch")
    return term.compute(inputs)

"""Fused Triton kernels for the distillation losses, equal to the torch reference in ``losses``.

``attention_transfer`` and ``soft_label`` take the reference's arguments and return its value;
the training code goes through ``kernels.dispatch``, which picks Triton or torch per call.
Triton is an optional dependency (the ``test`` extra): it is imported on first use, so
``import ernie_tiny_ds.kernels`` works without it. Kernels are decorated at that first import,
so TRITON_INTERPRET=1 (CPU) must be set before it.
"""
from __future__ import annotations

import torch

__all__ = ["attention_transfer", "soft_label"]


def attention_transfer(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                       attention_mask: torch.Tensor, kind: str = "kl",
                       relation_heads: int | None = None) -> torch.Tensor:
    """Fused ``losses.attention_transfer_loss`` (KL or MSE of Q/K attention scores); fp32 scalar.

    Memory is O(B*H*L) beyond the inputs (no L x L map). Gradients reach q_s and k_s only.
    """
    from .attention_transfer_triton import attention_transfer_triton
    return attention_transfer_triton(q_s, k_s, q_t, k_t, attention_mask, kind=kind, relation_heads=relation_heads)


def soft_label(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Fused ``losses.soft_label_loss``: batch-mean KL(teacher_T || student_T) * T^2; fp32 scalar."""
    from .soft_label_triton import soft_label_triton
    return soft_label_triton(student_logits, teacher_logits, temperature)

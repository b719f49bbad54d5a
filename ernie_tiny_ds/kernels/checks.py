"""Argument checks of the loss kernels, written once: the Triton launchers and the torch path call
them at their entry (and kernels.dispatch re-exports them). A module of its own so that the op files
import it without importing the dispatch that imports them."""
from __future__ import annotations

import torch

from .. import losses as _ref

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the Triton kernels take


def _check_fused(tensors: dict[str, torch.Tensor], *others: torch.Tensor) -> None:
    """What the Triton kernels need beyond the reference's checks: one device, a kernel dtype."""
    devices = {x.device for x in (*tensors.values(), *others)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    for name, x in tensors.items():
        if x.dtype not in KERNEL_DTYPES:
            raise ValueError(f"{name} has dtype {x.dtype}; the Triton kernel takes {KERNEL_DTYPES} "
                             "(use backend='torch' for others)")


def check_attention_inputs(q_s, k_s, q_t, k_t, attention_mask, kind: str, relation_heads: int | None,
                           fused: bool = False) -> None:
    """Attention-transfer arguments (kind, shapes, heads, mask); `fused`: also what the kernels need."""
    if kind not in _ref.ATTENTION_KINDS:
        raise ValueError(f"attention kind must be one of {_ref.ATTENTION_KINDS}, got {kind!r}")
    _ref.check_qk(q_s, k_s, q_t, k_t, attention_mask, relation_heads)
    if fused:
        _check_fused({"q_s": q_s, "k_s": k_s, "q_t": q_t, "k_t": k_t}, attention_mask)
        if q_s.dtype != k_s.dtype or q_t.dtype != k_t.dtype:
            raise ValueError("q and k of one model must have the same dtype")


def check_soft_label_inputs(student_logits, teacher_logits, temperature: float, fused: bool = False) -> None:
    """Soft-label arguments (temperature, shapes: the reference's own check); `fused`: also what the
    kernel needs."""
    _ref.check_soft_label(student_logits, teacher_logits, temperature)
    if fused:
        if student_logits.dim() == 0 or student_logits.numel() == 0:
            raise ValueError(f"logits need at least one row and one class, got shape {tuple(student_logits.shape)}")
        _check_fused({"student_logits": student_logits, "teacher_logits": teacher_logits})

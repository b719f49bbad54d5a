"""Fused temperature-scaled soft-label loss KL(softmax(t/T) || softmax(s/T)) * T^2 in Triton.

Reference: ``ernie_tiny_ds.losses.soft_label_loss``. Each program owns a block of rows and
walks the classes block by block with an online log-sum-exp for both models plus the running
sum of exp(t - m_t) * (t - s); with lse = m + log(l) the row loss is
sum_c p_t,c (t_c - s_c) + lse_s - lse_t. Short rows (2-class heads) share a program so the
launch (and the CPU interpreter's per-program cost) is amortised; a 30k vocabulary row loops.
The backward recomputes p_s - p_t from the saved LSEs; only the student gets a gradient.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# elements per program and step, sized so the sm_90 cubins do not spill registers (checked with
# cuobjdump -res-usage): one row of up to 4096 classes, or rows x classes <= 1024 for short rows
_ROW_TILE = 4096
_MULTI_ROW_TILE = 1024


@triton.jit
def _load_scaled(ptr, offs_r, offs_c, stride_r, valid, temperature):
    # padding reads -inf: it then adds nothing to any sum of exponentials
    x = tl.load(ptr + offs_r[:, None] * stride_r + offs_c[None, :], mask=valid, other=float("-inf"))
    return x.to(tl.float32) / temperature


@triton.jit
def _soft_label_fwd(S, T, ROWS, LSE_S, LSE_T, N, C, stride_s, stride_t, temperature,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = offs_r < N
    m_s = tl.full([BLOCK_R], float("-inf"), tl.float32)
    m_t = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_s = tl.zeros([BLOCK_R], tl.float32)
    l_t = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R], tl.float32)
    for start in range(0, C, BLOCK_C):
        offs_c = start + tl.arange(0, BLOCK_C)
        valid = row_ok[:, None] & (offs_c[None, :] < C)
        s = _load_scaled(S, offs_r, offs_c, stride_s, valid, temperature)
        t = _load_scaled(T, offs_r, offs_c, stride_t, valid, temperature)
        new_m_s = tl.maximum(m_s, tl.max(s, 1))
        new_m_t = tl.maximum(m_t, tl.max(t, 1))
        # rows past N stay at -inf: shift them by 0 so exp never sees -inf - -inf
        ref_s = tl.where(new_m_s == float("-inf"), 0.0, new_m_s)
        ref_t = tl.where(new_m_t == float("-inf"), 0.0, new_m_t)
        alpha_t = tl.exp(m_t - ref_t)
        p_t = tl.exp(t - ref_t[:, None])
        l_s = l_s * tl.exp(m_s - ref_s) + tl.sum(tl.exp(s - ref_s[:, None]), 1)
        l_t = l_t * alpha_t + tl.sum(p_t, 1)
        acc = acc * alpha_t + tl.sum(p_t * (tl.where(valid, t, 0.0) - tl.where(valid, s, 0.0)), 1)
        m_s = new_m_s
        m_t = new_m_t
    # rows past N (max -inf, sum 0) get finite placeholders; they are never stored
    m_s = tl.where(row_ok, m_s, 0.0)
    m_t = tl.where(row_ok, m_t, 0.0)
    safe_l_s = tl.where(row_ok, l_s, 1.0)
    safe_l_t = tl.where(row_ok, l_t, 1.0)
    lse_s = m_s + tl.log(safe_l_s)  # for the backward
    lse_t = m_t + tl.log(safe_l_t)
    # lse_s - lse_t as (m_s - m_t) + log(l_s / l_t): rounding each lse would swamp a small KL
    row = acc / safe_l_t + (m_s - m_t) + tl.log(safe_l_s / safe_l_t)
    tl.store(ROWS + offs_r, row, mask=row_ok)
    tl.store(LSE_S + offs_r, lse_s, mask=row_ok)
    tl.store(LSE_T + offs_r, lse_t, mask=row_ok)


@triton.jit
def _soft_label_bwd(S, T, LSE_S, LSE_T, D_ROWS, DS, N, C, stride_s, stride_t, stride_ds, temperature,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """d(row loss)/d(student logit) = (p_s - p_t) / T, times the incoming per-row gradient."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = offs_r < N
    lse_s = tl.load(LSE_S + offs_r, mask=row_ok, other=0.0)
    lse_t = tl.load(LSE_T + offs_r, mask=row_ok, other=0.0)
    scale = tl.load(D_ROWS + offs_r, mask=row_ok, other=0.0) / temperature
    for start in range(0, C, BLOCK_C):
        offs_c = start + tl.arange(0, BLOCK_C)
        valid = row_ok[:, None] & (offs_c[None, :] < C)
        s = _load_scaled(S, offs_r, offs_c, stride_s, valid, temperature)
        t = _load_scaled(T, offs_r, offs_c, stride_t, valid, temperature)
        grad = (tl.exp(s - lse_s[:, None]) - tl.exp(t - lse_t[:, None])) * scale[:, None]
        tl.store(DS + offs_r[:, None] * stride_ds + offs_c[None, :], grad, mask=valid)


# --------------------------------------------------------------------------- launchers
def _blocks(n_rows: int, n_classes: int) -> tuple[int, int]:
    """(rows per program, classes per step): many short rows share a program, long rows loop."""
    block_c = min(_ROW_TILE, max(16, triton.next_power_of_2(n_classes)))
    block_r = min(max(1, _MULTI_ROW_TILE // block_c), triton.next_power_of_2(max(n_rows, 1)))
    return block_r, block_c


def soft_label_rows_forward(s: torch.Tensor, t: torch.Tensor, temperature: float):
    """Per-row KL(t_T || s_T) [N] in fp32 and the per-row LSEs of both (rows [N, C], unit column stride)."""
    n, c = s.shape
    rows = torch.empty(n, device=s.device, dtype=torch.float32)
    lse_s, lse_t = torch.empty_like(rows), torch.empty_like(rows)
    block_r, block_c = _blocks(n, c)
    _soft_label_fwd[(triton.cdiv(n, block_r),)](
        s, t, rows, lse_s, lse_t, n, c, s.stride(0), t.stride(0), float(temperature),
        BLOCK_R=block_r, BLOCK_C=block_c)
    return rows, lse_s, lse_t


def soft_label_rows_backward(s, t, lse_s, lse_t, d_rows, temperature: float) -> torch.Tensor:
    n, c = s.shape
    # fp32 out, rounded by torch: the 3.9 interpreter truncates fp32 -> bf16 inside kernels
    grad = torch.empty((n, c), device=s.device, dtype=torch.float32)
    block_r, block_c = _blocks(n, c)
    _soft_label_bwd[(triton.cdiv(n, block_r),)](
        s, t, lse_s, lse_t, d_rows.float().contiguous(), grad, n, c, s.stride(0), t.stride(0), grad.stride(0),
        float(temperature), BLOCK_R=block_r, BLOCK_C=block_c)
    return grad.to(s.dtype)


class SoftLabelRows(torch.autograd.Function):
    """[N] per-row KL(softmax(t/T) || softmax(s/T)); the gradient flows to the student logits only."""

    @staticmethod
    def forward(ctx, s, t, temperature: float):
        rows, lse_s, lse_t = soft_label_rows_forward(s, t, temperature)
        ctx.save_for_backward(s, t, lse_s, lse_t)
        ctx.temperature = temperature
        return rows

    @staticmethod
    @once_differentiable
    def backward(ctx, d_rows):
        s, t, lse_s, lse_t = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return soft_label_rows_backward(s, t, lse_s, lse_t, d_rows, ctx.temperature), None, None


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def soft_label_triton(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """Same value and student gradient as ``losses.soft_label_loss``; fp32 scalar."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit shapes differ: student {tuple(student_logits.shape)}, "
                         f"teacher {tuple(teacher_logits.shape)}")
    if student_logits.dim() == 0 or student_logits.shape[-1] == 0 or student_logits.numel() == 0:
        raise ValueError(f"logits need at least one row and one class, got shape {tuple(student_logits.shape)}")
    if student_logits.device != teacher_logits.device:
        raise ValueError(f"student logits on {student_logits.device}, teacher logits on {teacher_logits.device}")
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if x.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {x.dtype}; the Triton kernel takes {SUPPORTED_DTYPES} "
                             "(use backend='torch' for others)")
    temperature = float(temperature)
    rows = SoftLabelRows.apply(_as_rows(student_logits), _as_rows(teacher_logits), temperature)
    return rows.mean() * temperature ** 2

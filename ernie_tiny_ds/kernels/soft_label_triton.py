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

from .checks import check_soft_label_inputs
from .online_kl_triton import online_kl_finish, online_kl_start, online_kl_update

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
    m_s, m_t, l_s, l_t, acc = online_kl_start(BLOCK_R)
    for start in range(0, C, BLOCK_C):
        offs_c = start + tl.arange(0, BLOCK_C)
        valid = row_ok[:, None] & (offs_c[None, :] < C)
        s = _load_scaled(S, offs_r, offs_c, stride_s, valid, temperature)
        t = _load_scaled(T, offs_r, offs_c, stride_t, valid, temperature)
        # t - s where valid, taken apart: padding is -inf on both sides
        t_minus_s = tl.where(valid, t, 0.0) - tl.where(valid, s, 0.0)
        m_s, m_t, l_s, l_t, acc = online_kl_update(m_s, m_t, l_s, l_t, acc, s, t, t_minus_s)
    # rows past N get finite placeholders; they are never stored
    row, lse_s, lse_t = online_kl_finish(m_s, m_t, l_s, l_t, acc, row_ok)
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
        S=s, T=t, ROWS=rows, LSE_S=lse_s, LSE_T=lse_t, N=n, C=c, stride_s=s.stride(0), stride_t=t.stride(0),
        temperature=float(temperature), BLOCK_R=block_r, BLOCK_C=block_c)
    return rows, lse_s, lse_t


def soft_label_rows_backward(s, t, lse_s, lse_t, d_rows, temperature: float) -> torch.Tensor:
    n, c = s.shape
    # fp32 out, rounded by torch: the 3.9 interpreter truncates fp32 -> bf16 inside kernels
    grad = torch.empty((n, c), device=s.device, dtype=torch.float32)
    block_r, block_c = _blocks(n, c)
    _soft_label_bwd[(triton.cdiv(n, block_r),)](
        S=s, T=t, LSE_S=lse_s, LSE_T=lse_t, D_ROWS=d_rows.float().contiguous(), DS=grad, N=n, C=c,
        stride_s=s.stride(0), stride_t=t.stride(0), stride_ds=grad.stride(0), temperature=float(temperature),
        BLOCK_R=block_r, BLOCK_C=block_c)
    return grad.to(s.dtype)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


# --------------------------------------------------------------------------- autograd
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


# --------------------------------------------------------------------------- public function
def soft_label_triton(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """Same value and student gradient as ``losses.soft_label_loss``; fp32 scalar."""
    check_soft_label_inputs(student_logits, teacher_logits, temperature, fused=True)
    temperature = float(temperature)
    rows = SoftLabelRows.apply(_as_rows(student_logits), _as_rows(teacher_logits), temperature)
    return rows.mean() * temperature ** 2

"""Fused attention-transfer loss (KL or MSE of teacher vs student attention scores) in Triton.

Reference: ``ernie_tiny_ds.losses.attention_transfer_loss``. Per (batch, head, query row) the
forward walks the keys block by block and keeps only running statistics in registers:

  kind "kl":  running max + sum of exp for both models (online log-sum-exp) and the running
              sum of exp(s_t - m_t) * (s_t - s_s). With lse = m + log(l) the row loss is
              sum_j p_t,j (s_t,j - s_s,j) + lse_s - lse_t  (= KL(p_t || p_s) of the row).
  kind "mse": running sum of (s_s - s_t)^2 over valid keys.

No L x L tile ever leaves registers. The forward saves the two per-row LSEs; the backward
recomputes score tiles FlashAttention-style in one kernel launched twice (programs own query
blocks -> dQ_s, then key blocks -> dK_s), so there are no atomics and the result is deterministic.
The teacher gets no gradient.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable
from triton.runtime.interpreter import InterpretedFunction

from .. import losses as _ref
from .checks import check_attention_inputs
from .online_kl_triton import online_kl_finish, online_kl_start, online_kl_update


# --------------------------------------------------------------------------- kernels
@triton.jit
def _load_rows(ptr, offs_l, offs_d, stride_l, stride_d, L, D):
    """A [rows, BLOCK_D] tile; rows past L and columns past D (power-of-2 padding) read 0."""
    return tl.load(ptr + offs_l[:, None] * stride_l + offs_d[None, :] * stride_d,
                   mask=(offs_l[:, None] < L) & (offs_d[None, :] < D), other=0.0)


@triton.jit
def _head_of_program(H):
    """Axis 0 of the grid walks (batch, head) pairs: this program's (bh, b, h)."""
    bh = tl.program_id(0)
    return bh, bh // H, bh % H


@triton.jit
def _load_pair(S, T, b, h, s_b, s_h, s_l, s_d, t_b, t_h, t_l, t_d, offs, L, D_S, D_T,
               BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr):
    """Rows `offs` of one (batch, head) of the student's and the teacher's tensor (Q or K)."""
    x_s = _load_rows(S + b * s_b + h * s_h, offs, tl.arange(0, BLOCK_DS), s_l, s_d, L, D_S)
    x_t = _load_rows(T + b * t_b + h * t_h, offs, tl.arange(0, BLOCK_DT), t_l, t_d, L, D_T)
    return x_s, x_t


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b accumulated in fp32. UPCAST: the Triton CPU interpreter multiplies bf16 operands as
    raw uint16 bits (3.9), so there they go to fp32 first; bf16 products are exact in fp32,
    so the result equals the GPU's bf16 MMA with fp32 accumulation."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _scores(q, k, scale, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Scaled dot products q k^T / sqrt(d) of one tile, accumulated in fp32."""
    return _dot(q, tl.trans(k), PREC, UPCAST) * scale


@triton.jit
def _load_lse(LSE_S, LSE_T, offs, in_range, BLOCK_M: tl.constexpr, IS_KL: tl.constexpr):
    """Per-row LSEs saved by the forward; "mse" saves none (its buffers are 1-element dummies)."""
    if IS_KL:
        lse_s = tl.load(LSE_S + offs, mask=in_range, other=0.0)
        lse_t = tl.load(LSE_T + offs, mask=in_range, other=0.0)
    else:
        lse_s = tl.zeros([BLOCK_M], tl.float32)
        lse_t = tl.zeros([BLOCK_M], tl.float32)
    return lse_s, lse_t


@triton.jit
def _grad_student_scores(s_s, s_t, lse_s, lse_t, d_row, pair_valid, IS_KL: tl.constexpr):
    """d(row loss)/d(student score) of a tile, times the incoming per-row gradient.
    lse_s, lse_t, d_row come broadcastable to the tile: [M, 1] for a query-major tile, [1, M] for key-major."""
    if IS_KL:
        # padded pairs go to -inf first: padded rows have lse 0 and exp(score) could overflow
        g = tl.exp(tl.where(pair_valid, s_s, float("-inf")) - lse_s) \
            - tl.exp(tl.where(pair_valid, s_t, float("-inf")) - lse_t)  # p_s - p_t
    else:
        g = 2.0 * (s_s - s_t)
    return tl.where(pair_valid, g * d_row, 0.0)


@triton.jit
def _attention_transfer_fwd(
    QS, KS, QT, KT, MASK, ROWS, LSE_S, LSE_T,
    sqs_b, sqs_h, sqs_l, sqs_d, sks_b, sks_h, sks_l, sks_d,
    sqt_b, sqt_h, sqt_l, sqt_d, skt_b, skt_h, skt_l, skt_d,
    H, L, D_S, D_T, scale_s, scale_t,
    IS_KL: tl.constexpr, PREC_S: tl.constexpr, PREC_T: tl.constexpr,
    UPCAST_S: tl.constexpr, UPCAST_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
):
    """One program owns a query block of one (batch, head) and streams all key blocks."""
    bh, b, h = _head_of_program(H)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    q_s, q_t = _load_pair(QS, QT, b, h, sqs_b, sqs_h, sqs_l, sqs_d, sqt_b, sqt_h, sqt_l, sqt_d,
                          offs_m, L, D_S, D_T, BLOCK_DS, BLOCK_DT)
    row_valid = tl.load(MASK + b * L + offs_m, mask=offs_m < L, other=0) != 0

    m_s, m_t, l_s, l_t, acc = online_kl_start(BLOCK_M)
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_valid = (tl.load(MASK + b * L + offs_n, mask=offs_n < L, other=0) != 0)[None, :]
        k_s, k_t = _load_pair(KS, KT, b, h, sks_b, sks_h, sks_l, sks_d, skt_b, skt_h, skt_l, skt_d,
                              offs_n, L, D_S, D_T, BLOCK_DS, BLOCK_DT)
        s_s = _scores(q_s, k_s, scale_s, PREC_S, UPCAST_S)
        s_t = _scores(q_t, k_t, scale_t, PREC_T, UPCAST_T)
        if IS_KL:
            m_s, m_t, l_s, l_t, acc = online_kl_update(
                m_s, m_t, l_s, l_t, acc, tl.where(key_valid, s_s, float("-inf")),
                tl.where(key_valid, s_t, float("-inf")), tl.where(key_valid, s_t - s_s, 0.0))
        else:
            diff = tl.where(key_valid, s_s - s_t, 0.0)
            acc += tl.sum(diff * diff, 1)

    in_range = offs_m < L
    if IS_KL:
        # padded rows (a fully padded sequence saw no valid key) are zeroed below; the backward masks them
        row, lse_s, lse_t = online_kl_finish(m_s, m_t, l_s, l_t, acc, row_valid)
        tl.store(LSE_S + bh * L + offs_m, lse_s, mask=in_range)
        tl.store(LSE_T + bh * L + offs_m, lse_t, mask=in_range)
    else:
        row = acc
    tl.store(ROWS + bh * L + offs_m, tl.where(row_valid, row, 0.0), mask=in_range)


@triton.jit
def _attention_transfer_bwd(
    QS, KS, QT, KT, MASK, LSE_S, LSE_T, D_ROWS, DX,
    sqs_b, sqs_h, sqs_l, sqs_d, sks_b, sks_h, sks_l, sks_d,
    sqt_b, sqt_h, sqt_l, sqt_d, skt_b, skt_h, skt_l, skt_d,
    sdx_b, sdx_h, sdx_l, sdx_d,
    H, L, D_S, D_T, scale_s, scale_t,
    KEY_MAJOR: tl.constexpr, IS_KL: tl.constexpr, PREC_S: tl.constexpr, PREC_T: tl.constexpr,
    UPCAST_S: tl.constexpr, UPCAST_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
):
    """One program owns a block of one axis and walks the other, recomputing the score tiles:
      KEY_MAJOR false: a query block, DX = dQ_s = scale_s * sum over key blocks of dS @ K_s;
      KEY_MAJOR true:  a key block,   DX = dK_s = scale_s * sum over query blocks of dS^T @ Q_s.
    Key-major tiles are [keys, queries] (scores as K Q^T), so dS^T needs no transpose: a transposed
    operand made the fp32 (FMA) dot spill to local memory on sm_90. KEY_MAJOR is a constexpr, so each
    launch compiles only its own branch."""
    bh, b, h = _head_of_program(H)
    offs_ds = tl.arange(0, BLOCK_DS)
    if KEY_MAJOR:
        offs_x = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        k_s, k_t = _load_pair(KS, KT, b, h, sks_b, sks_h, sks_l, sks_d, skt_b, skt_h, skt_l, skt_d,
                              offs_x, L, D_S, D_T, BLOCK_DS, BLOCK_DT)
        key_valid = tl.load(MASK + b * L + offs_x, mask=offs_x < L, other=0) != 0
        dx = tl.zeros([BLOCK_N, BLOCK_DS], tl.float32)
        for start_m in range(0, L, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            in_range = offs_m < L
            row_valid = tl.load(MASK + b * L + offs_m, mask=in_range, other=0) != 0
            lse_s, lse_t = _load_lse(LSE_S, LSE_T, bh * L + offs_m, in_range, BLOCK_M, IS_KL)
            d_row = tl.load(D_ROWS + bh * L + offs_m, mask=in_range, other=0.0)
            q_s, q_t = _load_pair(QS, QT, b, h, sqs_b, sqs_h, sqs_l, sqs_d, sqt_b, sqt_h, sqt_l, sqt_d,
                                  offs_m, L, D_S, D_T, BLOCK_DS, BLOCK_DT)
            s_s = _scores(k_s, q_s, scale_s, PREC_S, UPCAST_S)  # [keys, queries]
            s_t = _scores(k_t, q_t, scale_t, PREC_T, UPCAST_T)
            ds = _grad_student_scores(s_s, s_t, lse_s[None, :], lse_t[None, :], d_row[None, :],
                                      key_valid[:, None] & row_valid[None, :], IS_KL)
            dx += tl.dot(ds, q_s.to(tl.float32), input_precision=PREC_S)
    else:
        offs_x = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        q_s, q_t = _load_pair(QS, QT, b, h, sqs_b, sqs_h, sqs_l, sqs_d, sqt_b, sqt_h, sqt_l, sqt_d,
                              offs_x, L, D_S, D_T, BLOCK_DS, BLOCK_DT)
        in_range = offs_x < L
        row_valid = tl.load(MASK + b * L + offs_x, mask=in_range, other=0) != 0
        lse_s, lse_t = _load_lse(LSE_S, LSE_T, bh * L + offs_x, in_range, BLOCK_M, IS_KL)
        d_row = tl.load(D_ROWS + bh * L + offs_x, mask=in_range, other=0.0)
        dx = tl.zeros([BLOCK_M, BLOCK_DS], tl.float32)
        for start_n in range(0, L, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            key_valid = tl.load(MASK + b * L + offs_n, mask=offs_n < L, other=0) != 0
            k_s, k_t = _load_pair(KS, KT, b, h, sks_b, sks_h, sks_l, sks_d, skt_b, skt_h, skt_l, skt_d,
                                  offs_n, L, D_S, D_T, BLOCK_DS, BLOCK_DT)
            s_s = _scores(q_s, k_s, scale_s, PREC_S, UPCAST_S)
            s_t = _scores(q_t, k_t, scale_t, PREC_T, UPCAST_T)
            ds = _grad_student_scores(s_s, s_t, lse_s[:, None], lse_t[:, None], d_row[:, None],
                                      row_valid[:, None] & key_valid[None, :], IS_KL)
            # dS stays fp32 (rounding it to bf16 alone costs ~5e-3 relative error); tf32 on GPU for 16-bit inputs
            dx += tl.dot(ds, k_s.to(tl.float32), input_precision=PREC_S)
    dx = dx * scale_s
    tl.store(DX + b * sdx_b + h * sdx_h + offs_x[:, None] * sdx_l + offs_ds[None, :] * sdx_d,
             dx, mask=(offs_x < L)[:, None] & (offs_ds[None, :] < D_S))


# --------------------------------------------------------------------------- launchers
# triton decided interpreted vs compiled when it decorated the kernels above (triton.knobs, which
# says it too, only exists in recent triton releases)
_INTERPRETED = isinstance(_attention_transfer_fwd, InterpretedFunction)


def _block_d(d: int) -> int:
    # tl.arange needs a power of 2 and tl.dot a K of at least 16
    return max(16, triton.next_power_of_2(d))


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to TF32 on GPU: the reference matmul is full fp32
    return "ieee" if dtype == torch.float32 else "tf32"


def _strides(**tensors: torch.Tensor) -> dict[str, int]:
    """Strides of [B, H, L, d] tensors as the kernels name them: _strides(sqs=q_s) gives sqs_b, sqs_h, sqs_l, sqs_d."""
    return {f"{prefix}_{axis}": stride for prefix, t in tensors.items() for axis, stride in zip("bhld", t.stride())}


def _upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and _INTERPRETED


class Tiling(NamedTuple):
    block_m: int  # query rows per tile
    block_n: int  # keys per tile
    num_warps: int


def _meta(q_s, q_t, is_kl: bool, tiling: Tiling) -> dict:
    return dict(IS_KL=is_kl, PREC_S=_precision(q_s.dtype), PREC_T=_precision(q_t.dtype),
                UPCAST_S=_upcast(q_s.dtype), UPCAST_T=_upcast(q_t.dtype),
                BLOCK_M=tiling.block_m, BLOCK_N=tiling.block_n, num_warps=tiling.num_warps,
                BLOCK_DS=_block_d(q_s.shape[-1]), BLOCK_DT=_block_d(q_t.shape[-1]))


def _shapes(q_s, q_t) -> dict:
    return dict(H=q_s.shape[1], L=q_s.shape[2], D_S=q_s.shape[3], D_T=q_t.shape[3],
                scale_s=1.0 / math.sqrt(q_s.shape[3]), scale_t=1.0 / math.sqrt(q_t.shape[3]))


def _inputs(q_s, k_s, q_t, k_t, mask) -> dict:
    """The operands every kernel reads, with their strides."""
    return dict(QS=q_s, KS=k_s, QT=q_t, KT=k_t, MASK=mask, **_strides(sqs=q_s, sks=k_s, sqt=q_t, skt=k_t))


def attention_transfer_rows_forward(q_s, k_s, q_t, k_t, mask, is_kl: bool, tiling: Tiling):
    """Per-row losses [B, H, L] (fp32, 0 on padded rows) and the per-row LSEs of both models."""
    b, h, length, _ = q_s.shape
    rows = torch.empty((b, h, length), device=q_s.device, dtype=torch.float32)
    lse_s = torch.empty_like(rows) if is_kl else rows.new_empty(1)
    lse_t = torch.empty_like(rows) if is_kl else rows.new_empty(1)
    grid = (b * h, triton.cdiv(length, tiling.block_m))
    _attention_transfer_fwd[grid](
        **_inputs(q_s, k_s, q_t, k_t, mask), ROWS=rows, LSE_S=lse_s, LSE_T=lse_t,
        **_shapes(q_s, q_t), **_meta(q_s, q_t, is_kl, tiling))
    return rows, lse_s, lse_t


def attention_transfer_rows_backward(q_s, k_s, q_t, k_t, mask, lse_s, lse_t, d_rows, is_kl: bool,
                                     tiling: Tiling, need_dq: bool = True, need_dk: bool = True):
    """dL/dQ_s and dL/dK_s (in the student's dtype) for an upstream gradient d_rows [B, H, L].

    The kernels write fp32; torch rounds to the student's dtype (round-to-nearest everywhere:
    the 3.9 interpreter truncates fp32 -> bf16 inside kernels)."""
    b, h, length, _ = q_s.shape
    common = dict(**_inputs(q_s, k_s, q_t, k_t, mask), LSE_S=lse_s, LSE_T=lse_t, D_ROWS=d_rows.float().contiguous(),
                  **_shapes(q_s, q_t), **_meta(q_s, q_t, is_kl, tiling))
    dq = dk = None
    if need_dq:
        dq = torch.empty(q_s.shape, device=q_s.device, dtype=torch.float32)
        _attention_transfer_bwd[(b * h, triton.cdiv(length, tiling.block_m))](
            DX=dq, **_strides(sdx=dq), KEY_MAJOR=False, **common)
        dq = dq.to(q_s.dtype)
    if need_dk:
        dk = torch.empty(k_s.shape, device=k_s.device, dtype=torch.float32)
        _attention_transfer_bwd[(b * h, triton.cdiv(length, tiling.block_n))](
            DX=dk, **_strides(sdx=dk), KEY_MAJOR=True, **common)
        dk = dk.to(k_s.dtype)
    return dq, dk


# --------------------------------------------------------------------------- autograd
class AttentionTransferRows(torch.autograd.Function):
    """[B, H, L] per-row attention-transfer losses; gradients flow to the student's Q and K only."""

    @staticmethod
    def forward(ctx, q_s, k_s, q_t, k_t, mask, is_kl: bool, tiling: Tiling):
        rows, lse_s, lse_t = attention_transfer_rows_forward(q_s, k_s, q_t, k_t, mask, is_kl, tiling)
        ctx.save_for_backward(q_s, k_s, q_t, k_t, mask, lse_s, lse_t)
        ctx.config = (is_kl, tiling)
        return rows

    @staticmethod
    @once_differentiable
    def backward(ctx, d_rows):
        q_s, k_s, q_t, k_t, mask, lse_s, lse_t = ctx.saved_tensors
        is_kl, tiling = ctx.config
        dq, dk = attention_transfer_rows_backward(
            q_s, k_s, q_t, k_t, mask, lse_s, lse_t, d_rows, is_kl, tiling,
            need_dq=ctx.needs_input_grad[0], need_dk=ctx.needs_input_grad[1])
        return dq, dk, None, None, None, None, None


# --------------------------------------------------------------------------- public function
def default_tiling(length: int, fp32_dots: bool) -> Tiling:
    """Tiles that fit sm_90 registers without spilling (checked with cuobjdump -res-usage on the
    cubins): 64 x 64 / 4 warps for 16-bit inputs; fp32 "ieee" dots run on CUDA cores and need
    64 x 32 / 8 warps. Short sequences shrink the tile (not below tl.dot's minimum 16)."""
    block_m, block_n, warps = (64, 32, 8) if fp32_dots else (64, 64, 4)
    fit = max(16, triton.next_power_of_2(length))
    return Tiling(min(block_m, fit), min(block_n, fit), warps)


def attention_transfer_triton(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                              attention_mask: torch.Tensor, kind: str = "kl", relation_heads: int | None = None,
                              block_m: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """Same value and student gradients as ``losses.attention_transfer_loss``; fp32 scalar."""
    check_attention_inputs(q_s, k_s, q_t, k_t, attention_mask, kind, relation_heads, fused=True)
    if relation_heads is not None:
        # a view/reshape; autograd maps dQ/dK back to the original heads
        q_s, k_s, q_t, k_t = (_ref.split_relation_heads(x, relation_heads) for x in (q_s, k_s, q_t, k_t))
    tiling = default_tiling(q_s.shape[2], torch.float32 in (q_s.dtype, q_t.dtype))
    tiling = tiling._replace(block_m=block_m or tiling.block_m, block_n=block_n or tiling.block_n)
    for name, blk in (("block_m", tiling.block_m), ("block_n", tiling.block_n)):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"{name} must be a power of 2 >= 16, got {blk}")
    mask = attention_mask.bool()
    rows = AttentionTransferRows.apply(q_s, k_s, q_t, k_t, mask.to(torch.int32).contiguous(),
                                       kind == "kl", tiling)
    return rows.sum() / _ref.attention_denominator(mask, q_s.shape[1], kind)

"""The streaming row-wise KL(p_t || p_s) that both fused losses share, as inlined Triton helpers.

A row's logits (attention scores over keys, or class logits) arrive tile by tile. Per row the
kernel keeps, for each model, the running max m and the running sum l of exp(x - m) (online
log-sum-exp), and acc, the running sum of exp(x_t - m_t) * (x_t - x_s). With lse = m + log(l):
KL(p_t || p_s) of the row = acc / l_t + lse_s - lse_t.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def online_kl_start(BLOCK: tl.constexpr):
    """(m_s, m_t, l_s, l_t, acc) before the first tile."""
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    zero = tl.zeros([BLOCK], tl.float32)
    return m, m, zero, zero, zero


@triton.jit
def online_kl_update(m_s, m_t, l_s, l_t, acc, x_s, x_t, t_minus_s):
    """Fold in one [rows, cols] tile: x_s, x_t with -inf where a column is invalid; t_minus_s = x_t - x_s
    where valid, 0 elsewhere (so -inf - -inf never reaches the sum)."""
    new_m_s = tl.maximum(m_s, tl.max(x_s, 1))
    new_m_t = tl.maximum(m_t, tl.max(x_t, 1))
    # a row that has seen no valid column yet keeps max -inf: shift it by 0 so exp never sees -inf - -inf
    ref_s = tl.where(new_m_s == float("-inf"), 0.0, new_m_s)
    ref_t = tl.where(new_m_t == float("-inf"), 0.0, new_m_t)
    alpha_t = tl.exp(m_t - ref_t)
    p_t = tl.exp(x_t - ref_t[:, None])
    l_s = l_s * tl.exp(m_s - ref_s) + tl.sum(tl.exp(x_s - ref_s[:, None]), 1)
    l_t = l_t * alpha_t + tl.sum(p_t, 1)
    acc = acc * alpha_t + tl.sum(p_t * t_minus_s, 1)
    return new_m_s, new_m_t, l_s, l_t, acc


@triton.jit
def online_kl_finish(m_s, m_t, l_s, l_t, acc, row_ok):
    """(row KL, lse_s, lse_t). Rows outside `row_ok` (padding; they may have seen no valid column:
    max -inf, sum 0) get finite placeholders; the caller zeroes or skips them."""
    m_s = tl.where(row_ok, m_s, 0.0)
    m_t = tl.where(row_ok, m_t, 0.0)
    safe_l_s = tl.where(row_ok & (l_s > 0), l_s, 1.0)
    safe_l_t = tl.where(row_ok & (l_t > 0), l_t, 1.0)
    lse_s = m_s + tl.log(safe_l_s)
    lse_t = m_t + tl.log(safe_l_t)
    # lse_s - lse_t as (m_s - m_t) + log(l_s / l_t): rounding each lse (ulp of ~10) swamps a small KL
    # (a near-converged student); this form keeps it at the fp32 reference's accuracy
    row = acc / safe_l_t + (m_s - m_t) + tl.log(safe_l_s / safe_l_t)
    return row, lse_s, lse_t

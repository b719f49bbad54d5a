"""Attention transfer in plain torch with a hand-written backward: the path used off CUDA.

Same value as ``losses.attention_transfer_loss`` (the reference), computed with fewer passes over
the [B, H, L, L] score maps. Autograd through the reference keeps several L x L intermediates
and walks back through masked_fill, log_softmax and where; here the gradient of the scores has a
closed form, so the forward computes it once and the backward is two matrix products:

  kl   d loss / d s_s = softmax(s_s) - softmax(s_t)   (rows and keys of padding excluded)
  mse  d loss / d s_s = 2 (s_s - s_t)                 (over valid (query, key) pairs)

With ``query_chunk`` only [B, H, chunk, L] maps exist at a time: the forward keeps nothing but its
inputs and the backward recomputes each chunk's gradient map (memory O(B*H*L*chunk)).
Math runs in float32 for 16-bit inputs and in float64 for float64 inputs.
"""
from __future__ import annotations

import math

import torch

from .. import losses as _ref
from .checks import check_attention_inputs


def _chunk(q_s, k_s, q_t, k_t, keys, row_valid, is_kl: bool, want_loss: bool, want_grad: bool):
    """(summed loss of these query rows or None, map G or None) for one chunk of query rows.

    q_* are the chunk's query rows [B, H, C, d], already scaled by 1/sqrt(d); k_* all keys.
    keys is `_key_term(...)` [B, 1, 1, L], or None without padding; row_valid is [B, 1, C, 1]
    (1 = token) or None. G is d loss / d s_s up to a constant (2 for mse, applied by the caller);
    its padded query rows are left for the caller to zero on the [.., C, d] factors.
    """
    s_s = torch.matmul(q_s, k_s.transpose(-1, -2))
    s_t = torch.matmul(q_t, k_t.transpose(-1, -2))
    loss = grad = None
    if is_kl:
        # KL(p_t || p_s) per row = sum_k p_t (s_t - s_s) + lse(s_s) - lse(s_t): the raw difference is
        # finite on padded keys, where p_t = 0, so no map needs a masked log-probability. An additive
        # -inf bias (not masked_fill) and softmax keep exp() off huge negative numbers, which is slow.
        diff = s_t - s_s if want_loss else None
        if keys is not None:
            s_s += keys
            s_t += keys
        p_t = torch.softmax(s_t, dim=-1)
        if want_loss:
            row_kl = (p_t * diff).sum(dim=-1, keepdim=True)
            row_kl += torch.logsumexp(s_s, dim=-1, keepdim=True) - torch.logsumexp(s_t, dim=-1, keepdim=True)
            loss = (row_kl * row_valid if row_valid is not None else row_kl).sum()
        if want_grad:
            grad = torch.softmax(s_s, dim=-1).sub_(p_t)
        return loss, grad
    diff = s_s.sub_(s_t)
    if keys is not None:  # only valid keys count; padded rows drop out of the row sums below
        diff.mul_(keys)
    if want_loss:
        row_sq = diff.pow(2).sum(dim=-1, keepdim=True)
        loss = (row_sq * row_valid if row_valid is not None else row_sq).sum()
    return loss, diff if want_grad else None


def _key_term(mask: torch.Tensor, dtype: torch.dtype, is_kl: bool) -> torch.Tensor:
    """[B, 1, 1, L] for the padded keys. kl: an additive bias, 0 on tokens and -inf on padding (a
    sequence with no token keeps 0 everywhere: its rows are masked out anyway, and no softmax row
    is all -inf). mse: a factor, 1 on tokens and 0 on padding."""
    if not is_kl:
        return mask.to(dtype)[:, None, None, :]
    keep = mask | ~mask.any(dim=1, keepdim=True)
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~keep, float("-inf"))
    return bias[:, None, None, :]


class _AttentionTransferSum(torch.autograd.Function):
    """Sum over valid rows (kl) or pairs (mse) of the per-pair loss; gradients to q_s and k_s only."""

    @staticmethod
    def forward(ctx, q_s, k_s, q_t, k_t, mask, is_kl: bool, chunk: int):
        dtype = _ref.compute_dtype(q_s)
        scale_s, scale_t = 1.0 / math.sqrt(q_s.shape[-1]), 1.0 / math.sqrt(q_t.shape[-1])
        qs, ks = (q_s.to(dtype) * scale_s), k_s.to(dtype)
        qt, kt = (q_t.to(dtype) * scale_t), k_t.to(dtype)
        padded = not bool(mask.all())
        keys = _key_term(mask, dtype, is_kl) if padded else None
        length = q_s.shape[2]
        whole = chunk >= length  # one chunk: keep its map, and the backward is two products
        total, grad = qs.new_zeros(()), None
        for start in range(0, length, chunk):
            rows = slice(start, min(start + chunk, length))
            row_valid = mask[:, None, rows, None].to(dtype) if padded else None
            part, grad = _chunk(qs[:, :, rows], ks, qt[:, :, rows], kt, keys, row_valid, is_kl,
                                want_loss=True, want_grad=whole)
            total = total + part
        ctx.is_kl, ctx.chunk, ctx.padded, ctx.scale_s = is_kl, chunk, padded, scale_s
        ctx.dtypes = (q_s.dtype, k_s.dtype)
        if whole:
            ctx.save_for_backward(qs, ks, mask, grad)
        else:
            ctx.save_for_backward(qs, ks, mask, qt, kt)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        qs, ks, mask, *rest = ctx.saved_tensors
        length = qs.shape[2]
        row_valid = mask[:, None, :, None].to(qs.dtype) if ctx.padded else None
        recompute = len(rest) == 2
        keys = _key_term(mask, qs.dtype, ctx.is_kl) if ctx.padded and recompute else None
        # d loss / d q = (G k) * scale, d loss / d k = (G^T q) * scale; padded query rows carry no
        # loss, so they are zeroed on the [.., L, d] factors instead of on the L x L map
        q_rows = qs * row_valid if row_valid is not None else qs
        d_q = torch.empty_like(qs)
        d_k = torch.zeros_like(ks)
        for start in range(0, length, ctx.chunk):
            rows = slice(start, min(start + ctx.chunk, length))
            if recompute:
                qt, kt = rest
                _, grad_map = _chunk(qs[:, :, rows], ks, qt[:, :, rows], kt, keys, None, ctx.is_kl,
                                     want_loss=False, want_grad=True)
            else:
                grad_map = rest[0]
            d_q[:, :, rows] = torch.matmul(grad_map, ks)
            d_k += torch.matmul(grad_map.transpose(-1, -2), q_rows[:, :, rows])
        # q was scaled by scale_s before the product, so dq picks up scale_s (chain rule) and dk
        # has it already through the scaled q; mse's maps leave out the 2 of d(x^2)/dx
        grad_total = grad_total * (1.0 if ctx.is_kl else 2.0)
        if row_valid is not None:
            d_q = d_q * row_valid
        d_q = (d_q * (grad_total * ctx.scale_s)).to(ctx.dtypes[0])
        d_k = (d_k * grad_total).to(ctx.dtypes[1])
        return d_q, d_k, None, None, None, None, None


def attention_transfer_torch(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                             attention_mask: torch.Tensor, kind: str = "kl", relation_heads: int | None = None,
                             query_chunk: int | None = None) -> torch.Tensor:
    """``losses.attention_transfer_loss`` with a closed-form backward; same arguments, same value."""
    check_attention_inputs(q_s, k_s, q_t, k_t, attention_mask, kind, relation_heads)
    if relation_heads is not None:
        q_s, k_s, q_t, k_t = (_ref.split_relation_heads(x, relation_heads) for x in (q_s, k_s, q_t, k_t))
    mask = attention_mask.bool()
    heads, length = q_s.shape[1], q_s.shape[2]
    chunk = length if not query_chunk or query_chunk >= length else max(1, int(query_chunk))
    total = _AttentionTransferSum.apply(q_s, k_s, q_t.detach(), k_t.detach(), mask, kind == "kl", chunk)
    return total / _ref.attention_denominator(mask, heads, kind)

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


def _chunk_grad_map(q_s, k_s, q_t, k_t, key_bias, row_valid, is_kl: bool):
    """(summed loss of these query rows, d loss / d scores of the student) for one chunk of rows.

    q_* are the chunk's query rows [B, H, C, d], already scaled by 1/sqrt(d); k_* all keys.
    key_bias is [B, 1, 1, L], 0 on keys and -inf on padded keys, or None (no padding);
    row_valid is [B, 1, C, 1] (1 = token) or None.
    """
    s_s = torch.matmul(q_s, k_s.transpose(-1, -2))
    s_t = torch.matmul(q_t, k_t.transpose(-1, -2))
    if is_kl:
        # KL(p_t || p_s) per row = sum_k p_t (s_t - s_s) + lse(s_s) - lse(s_t): the raw difference is
        # finite on padded keys, where p_t = 0, so no map needs a masked log-probability. An additive
        # -inf bias (not masked_fill) and softmax keep exp() off huge negative numbers, which is slow.
        diff = s_t - s_s
        if key_bias is not None:
            s_s += key_bias
            s_t += key_bias
        p_t = torch.softmax(s_t, dim=-1)
        row_kl = (p_t * diff).sum(dim=-1, keepdim=True)
        row_kl += torch.logsumexp(s_s, dim=-1, keepdim=True) - torch.logsumexp(s_t, dim=-1, keepdim=True)
        if row_valid is not None:
            row_kl = row_kl * row_valid
        # the caller zeroes padded query rows on [.., C, d] factors, not on this map
        grad = torch.softmax(s_s, dim=-1).sub_(p_t)
        return row_kl.sum(), grad
    diff = s_s.sub_(s_t)
    if key_bias is not None:  # only valid (query, key) pairs count
        diff.mul_(torch.isfinite(key_bias).to(diff.dtype)).mul_(row_valid)
    return diff.pow(2).sum(), diff.mul_(2.0)


def _key_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, 1, L]: 0 on tokens, -inf on padding. A sequence with no token at all keeps 0
    everywhere (its rows are masked out anyway), so no softmax row is all -inf."""
    empty = ~mask.any(dim=1, keepdim=True)
    keep = mask | empty
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
        key_bias = _key_bias(mask, dtype) if padded else None
        length = q_s.shape[2]
        total, grads = qs.new_zeros(()), []
        for start in range(0, length, chunk):
            rows = slice(start, min(start + chunk, length))
            row_valid = mask[:, None, rows, None].to(dtype) if padded else None
            part, grad = _chunk_grad_map(qs[:, :, rows], ks, qt[:, :, rows], kt, key_bias, row_valid, is_kl)
            total = total + part
            if chunk >= length:
                grads.append(grad)  # one chunk: keep its map, the backward is two products
        ctx.is_kl, ctx.chunk, ctx.padded, ctx.scale_s = is_kl, chunk, padded, scale_s
        ctx.dtypes = (q_s.dtype, k_s.dtype)
        if grads:
            ctx.save_for_backward(qs, ks, mask, grads[0])
        else:
            ctx.save_for_backward(qs, ks, mask, qt, kt)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        qs, ks, mask, *rest = ctx.saved_tensors
        length = qs.shape[2]
        row_valid = mask[:, None, :, None].to(qs.dtype) if ctx.padded else None
        key_bias = _key_bias(mask, qs.dtype) if ctx.padded else None
        # d loss / d q = (G k) * scale, d loss / d k = (G^T q) * scale; padded query rows carry no
        # loss, so they are zeroed on the [.., L, d] factors instead of on the L x L map
        q_rows = qs * row_valid if row_valid is not None else qs
        d_q = torch.empty_like(qs)
        d_k = torch.zeros_like(ks)
        for start in range(0, length, ctx.chunk):
            rows = slice(start, min(start + ctx.chunk, length))
            if len(rest) == 1:
                grad_map = rest[0]
            else:
                qt, kt = rest
                chunk_rows = row_valid[:, :, rows] if row_valid is not None else None
                _, grad_map = _chunk_grad_map(qs[:, :, rows], ks, qt[:, :, rows], kt, key_bias, chunk_rows,
                                              ctx.is_kl)
            d_q[:, :, rows] = torch.matmul(grad_map, ks)
            d_k += torch.matmul(grad_map.transpose(-1, -2), q_rows[:, :, rows])
        # q was scaled by scale_s before the product, so dq picks up scale_s (chain rule) and dk
        # has it already through the scaled q
        factor = grad_total * ctx.scale_s
        if row_valid is not None:
            d_q = d_q * row_valid
        d_q = (d_q * factor).to(ctx.dtypes[0])
        d_k = (d_k * grad_total).to(ctx.dtypes[1])
        return d_q, d_k, None, None, None, None, None


def attention_transfer_torch(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                             attention_mask: torch.Tensor, kind: str = "kl", relation_heads: int | None = None,
                             query_chunk: int | None = None) -> torch.Tensor:
    """``losses.attention_transfer_loss`` with a closed-form backward; same arguments, same value."""
    if kind not in _ref.ATTENTION_KINDS:
        raise ValueError(f"attention kind must be one of {_ref.ATTENTION_KINDS}, got {kind!r}")
    _ref.check_qk(q_s, k_s, q_t, k_t, attention_mask, relation_heads)
    if relation_heads is not None:
        q_s, k_s, q_t, k_t = (_ref.split_relation_heads(x, relation_heads) for x in (q_s, k_s, q_t, k_t))
    mask = attention_mask.bool()
    heads, length = q_s.shape[1], q_s.shape[2]
    chunk = length if not query_chunk or query_chunk >= length else max(1, int(query_chunk))
    total = _AttentionTransferSum.apply(q_s, k_s, q_t.detach(), k_t.detach(), mask, kind == "kl", chunk)
    return total / _ref.attention_denominator(mask, heads, kind)

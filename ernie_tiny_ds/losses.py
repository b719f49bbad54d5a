"""Distillation losses (torch reference, float32 math) and the teacher-student layer mapping.

These functions are the definition of the objective: the fused kernels in
``ernie_tiny_ds.kernels`` must return exactly what these return.

Shapes: q/k are ``[B, H, L, d]``; ``attention_mask`` is ``[B, L]`` with 1 = token, 0 = padding.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

ATTENTION_KINDS = ("kl", "mse")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 math for 16-bit inputs; float64 inputs stay float64 (tests compare against them)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    return x.to(compute_dtype(x))


# --------------------------------------------------------------------------- layer mapping
def layer_map(teacher_layers: int, student_layers: int, spec: str | Sequence[int] = "uniform") -> list[int]:
    """Teacher layer (1-based) that each student layer 1..S learns from.

    ``uniform``: student layer i <- teacher layer round(i * T / S) (12 -> 4 gives 3, 6, 9, 12).
    ``last-k``: the last S teacher layers. A list gives the teacher layer of each student layer.
    """
    if student_layers < 1 or teacher_layers < 1:
        raise ValueError("teacher and student need at least one layer each")
    if isinstance(spec, str):
        if spec == "uniform":
            if student_layers > teacher_layers:
                raise ValueError(
                    f"uniform layer map needs student layers ({student_layers}) <= teacher layers ({teacher_layers})")
            # half-up rounding keeps the map strictly increasing and ending at the last layer
            return [max(1, math.floor(i * teacher_layers / student_layers + 0.5)) for i in range(1, student_layers + 1)]
        if spec == "last-k":
            if student_layers > teacher_layers:
                raise ValueError(
                    f"last-k layer map needs student layers ({student_layers}) <= teacher layers ({teacher_layers})")
            return list(range(teacher_layers - student_layers + 1, teacher_layers + 1))
        raise ValueError(f"unknown layer map {spec!r}: use 'uniform', 'last-k' or a list of teacher layers")
    mapping = [int(x) for x in spec]
    if len(mapping) != student_layers:
        raise ValueError(f"layer map lists {len(mapping)} teacher layers but the student has {student_layers} layers")
    bad = [x for x in mapping if not 1 <= x <= teacher_layers]
    if bad:
        raise ValueError(f"layer map entries {bad} are outside the teacher's layers 1..{teacher_layers}")
    return mapping


# --------------------------------------------------------------------------- hidden states
def hidden_mse_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between (already projected) student and teacher hidden states [B, L, D].

    Mean over non-padded tokens and the hidden dimension; without a mask, over all tokens.
    """
    s = _at_least_fp32(student_hidden)
    t = _at_least_fp32(teacher_hidden)
    sq = (s - t).pow(2).mean(dim=-1)  # [B, L]
    if attention_mask is None:
        return sq.mean()
    m = attention_mask.to(sq.dtype)
    return (sq * m).sum() / m.sum().clamp_min(1.0)


# --------------------------------------------------------------------------- attention transfer
def split_relation_heads(x: torch.Tensor, relation_heads: int) -> torch.Tensor:
    """Re-split the heads of [B, H, L, d] into R relation heads [B, R, L, H*d/R] (MiniLMv2)."""
    b, h, l, d = x.shape
    width = h * d
    if width % relation_heads:
        raise ValueError(f"relation_heads={relation_heads} does not divide the attention width {width}")
    return x.transpose(1, 2).reshape(b, l, relation_heads, width // relation_heads).transpose(1, 2)


def _scaled_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    q = _at_least_fp32(q)
    k = _at_least_fp32(k)
    return torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])


def check_qk(q_s, k_s, q_t, k_t, attention_mask, relation_heads):
    for name, x in (("q_s", q_s), ("k_s", k_s), ("q_t", q_t), ("k_t", k_t)):
        if x.dim() != 4:
            raise ValueError(f"{name} must be [B, H, L, d], got shape {tuple(x.shape)}")
    if q_s.shape != k_s.shape or q_t.shape != k_t.shape:
        raise ValueError("q and k of one model must have the same shape")
    if q_s.shape[0] != q_t.shape[0] or q_s.shape[2] != q_t.shape[2]:
        raise ValueError(f"student {tuple(q_s.shape)} and teacher {tuple(q_t.shape)} differ in batch or length")
    if relation_heads is None and q_s.shape[1] != q_t.shape[1]:
        raise ValueError(
            f"student has {q_s.shape[1]} heads and teacher {q_t.shape[1]}: set relation_heads to transfer attention")
    if attention_mask.shape != (q_s.shape[0], q_s.shape[2]):
        raise ValueError(f"attention_mask must be [B, L] = {(q_s.shape[0], q_s.shape[2])}, "
                         f"got {tuple(attention_mask.shape)}")


def _attention_chunk_sum(q_s, k_s, q_t, k_t, row_mask, key_mask, kind: str) -> torch.Tensor:
    """Sum of the per-(query, key) loss over the query rows given (a chunk, or all of them)."""
    s_s = _scaled_scores(q_s, k_s)
    s_t = _scaled_scores(q_t, k_t)
    key_valid = key_mask[:, None, None, :]  # [B, 1, 1, L]
    row_valid = row_mask[:, None, :, None]  # [B, 1, C, 1]
    if kind == "kl":
        neg = torch.finfo(torch.float32).min
        logp_s = torch.log_softmax(s_s.masked_fill(~key_valid, neg), dim=-1)
        logp_t = torch.log_softmax(s_t.masked_fill(~key_valid, neg), dim=-1)
        p_t = logp_t.exp()
        per_pair = torch.where(key_valid & row_valid, p_t * (logp_t - logp_s), torch.zeros_like(p_t))
    else:
        per_pair = torch.where(key_valid & row_valid, (s_s - s_t).pow(2), torch.zeros_like(s_s))
    return per_pair.sum()


def attention_transfer_loss(q_s: torch.Tensor, k_s: torch.Tensor, q_t: torch.Tensor, k_t: torch.Tensor,
                            attention_mask: torch.Tensor, kind: str = "kl",
                            relation_heads: int | None = None, query_chunk: int | None = None) -> torch.Tensor:
    """Attention transfer from Q/K of student (s) and teacher (t); a scalar.

    kind "kl": KL(teacher softmax || student softmax) over keys of the scaled dot products,
    padded keys excluded; mean over batch, heads and non-padded query rows.
    kind "mse": MSE of the scaled scores (TinyBERT), mean over valid (query, key) pairs.
    ``query_chunk`` processes that many query rows at a time, so memory is O(L * chunk).
    """
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"attention kind must be one of {ATTENTION_KINDS}, got {kind!r}")
    check_qk(q_s, k_s, q_t, k_t, attention_mask, relation_heads)
    if relation_heads is not None:
        q_s, k_s, q_t, k_t = (split_relation_heads(x, relation_heads) for x in (q_s, k_s, q_t, k_t))
    mask = attention_mask.bool()
    heads, length = q_s.shape[1], q_s.shape[2]
    if not query_chunk or query_chunk >= length:
        total = _attention_chunk_sum(q_s, k_s, q_t, k_t, mask, mask, kind)
    else:
        # Each chunk's [B, H, C, L] maps are recomputed in backward instead of kept: peak memory
        # O(B*H*L*chunk) in training too, not O(B*H*L^2) summed over the chunks.
        chunk = max(1, int(query_chunk))
        total = q_s.new_zeros((), dtype=torch.promote_types(q_s.dtype, torch.float32))
        for start in range(0, length, chunk):
            stop = min(start + chunk, length)
            total = total + checkpoint(_attention_chunk_sum, q_s[:, :, start:stop], k_s, q_t[:, :, start:stop], k_t,
                                       mask[:, start:stop], mask, kind, use_reentrant=False)
    return total / attention_denominator(mask, heads, kind)


def attention_denominator(mask: torch.Tensor, heads: int, kind: str) -> torch.Tensor:
    """kl: valid query rows x heads; mse: valid (query, key) pairs x heads (at least 1)."""
    if kind == "kl":
        count = mask.sum().to(torch.float32)
    else:
        count = (mask.sum(dim=1).to(torch.float32) ** 2).sum()
    return (count * heads).clamp_min(1.0)


# --------------------------------------------------------------------------- prediction layer
def check_soft_label(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> None:
    """The soft-label arguments every path takes (the fused kernel checks these, then its own needs)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit shapes differ: student {tuple(student_logits.shape)}, "
                         f"teacher {tuple(teacher_logits.shape)}")


def soft_label_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                    temperature: float = 1.0) -> torch.Tensor:
    """Batch-mean KL(softmax(teacher / T) || softmax(student / T)) * T^2 over rows [N, C]."""
    check_soft_label(student_logits, teacher_logits, temperature)
    s = _at_least_fp32(student_logits).reshape(-1, student_logits.shape[-1]) / temperature
    t = _at_least_fp32(teacher_logits).reshape(-1, teacher_logits.shape[-1]) / temperature
    logp_s = torch.log_softmax(s, dim=-1)
    logp_t = torch.log_softmax(t, dim=-1)
    kl = (logp_t.exp() * (logp_t - logp_s)).sum(dim=-1)
    return kl.mean() * temperature ** 2


def regression_soft_label_loss(student_outputs: torch.Tensor, teacher_outputs: torch.Tensor) -> torch.Tensor:
    """MSE between the student's and the teacher's outputs of a one-output (regression) head: a softmax
    over one output is constant, so a KL there would teach nothing (TinyBERT's choice for STS-B)."""
    if student_outputs.shape != teacher_outputs.shape:
        raise ValueError(f"output shapes differ: student {tuple(student_outputs.shape)}, "
                         f"teacher {tuple(teacher_outputs.shape)}")
    return F.mse_loss(_at_least_fp32(student_outputs), _at_least_fp32(teacher_outputs))


def hard_label_loss(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with gold labels; MSE when the head has one output (regression)."""
    if student_logits.shape[-1] == 1:
        return F.mse_loss(_at_least_fp32(student_logits).squeeze(-1), labels.float())
    return F.cross_entropy(_at_least_fp32(student_logits), labels.long())

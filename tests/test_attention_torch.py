"""The torch attention-transfer path (closed-form backward) against the float64 reference.

This is what trains off CUDA, so it must equal ``losses.attention_transfer_loss`` in value and in
gradient, with and without query chunks, on every padding pattern. Fresh random inputs each run.
"""
import pytest
import torch
from attention_reference import assert_matches_reference, qk, random_mask, ref_attention_fp64, rel

from ernie_tiny_ds import losses
from ernie_tiny_ds.kernels import dispatch
from ernie_tiny_ds.kernels.attention_transfer_torch import attention_transfer_torch

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}


def check(kind, dtype, query_chunk, relation_heads=None, hs=2, ds=8, ht=2, dt=16, length=29):
    q_s, k_s = qk(4, hs, length, ds, dtype, True)
    q_t, k_t = qk(4, ht, length, dt, dtype, False, hf_layout=True)
    mask = random_mask(4, length)  # full row, right padding, holes, one sequence all padding
    out = attention_transfer_torch(q_s, k_s, q_t, k_t, mask, kind, relation_heads, query_chunk)
    out.backward()
    assert out.dim() == 0 and out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert q_s.grad.dtype == dtype and k_s.grad.dtype == dtype

    assert_matches_reference(out, q_s, k_s, q_t, k_t, mask, kind, relation_heads, TOL[dtype])
    assert torch.isfinite(q_s.grad).all() and torch.isfinite(k_s.grad).all()


@pytest.mark.parametrize("kind", ["kl", "mse"])
@pytest.mark.parametrize("query_chunk", [None, 4, 7])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_float64_reference(kind, query_chunk, dtype):
    check(kind, dtype, query_chunk)


@pytest.mark.parametrize("kind, relation_heads", [("kl", 4), ("mse", 2)])
def test_relation_heads(kind, relation_heads):
    # student 4 heads x d6, teacher 2 heads x d16, re-split into relation heads
    check(kind, torch.float32, 8, relation_heads=relation_heads, hs=4, ds=6, ht=2, dt=16)


def test_bf16_inputs_use_float32_math():
    check("kl", torch.bfloat16, None)


def test_without_padding_equals_reference():
    q_s, k_s = qk(3, 2, 16, 8, torch.float32, True)
    q_t, k_t = qk(3, 2, 16, 8, torch.float32, False)
    mask = torch.ones(3, 16, dtype=torch.long, device=q_s.device)
    for kind in ("kl", "mse"):
        got = attention_transfer_torch(q_s, k_s, q_t, k_t, mask, kind)
        d_got = torch.autograd.grad(got, (q_s, k_s))
        want = ref_attention_fp64(q_s.double(), k_s.double(), q_t, k_t, mask, kind, None)
        d_want = torch.autograd.grad(losses.attention_transfer_loss(q_s, k_s, q_t, k_t, mask, kind), (q_s, k_s))
        assert abs(got.item() - want.item()) <= 1e-5 * want.item()
        assert rel(d_got[0], d_want[0]) <= 1e-5 and rel(d_got[1], d_want[1]) <= 1e-5


def test_small_kl_of_a_near_converged_student_stays_accurate():
    # KL ~1e-4: the lse difference cancels against sum p_t (s_t - s_s); fp32 must still hold 1e-3 relative
    q_t, k_t = qk(2, 2, 64, 16, torch.float32, False)
    q_s, k_s = (x + 0.01 * torch.randn_like(x) for x in (q_t, k_t))
    mask = random_mask(2, 64)
    got = attention_transfer_torch(q_s, k_s, q_t, k_t, mask, "kl").item()
    want = ref_attention_fp64(q_s, k_s, q_t, k_t, mask, "kl", None).item()
    assert 0 < want < 1e-3 and abs(got - want) <= 1e-3 * want, (got, want)


def test_teacher_gets_no_grad_and_all_padded_batch_is_zero():
    q_s, k_s = qk(2, 2, 20, 8, torch.float32, True)
    q_t, k_t = qk(2, 2, 20, 8, torch.float32, True)
    mask = torch.zeros(2, 20, dtype=torch.long, device=q_s.device)
    for chunk in (None, 6):
        q_s.grad = k_s.grad = None
        out = attention_transfer_torch(q_s, k_s, q_t, k_t, mask, "kl", query_chunk=chunk)
        out.backward()
        assert out.item() == 0.0 and q_s.grad.abs().max() == 0 and k_s.grad.abs().max() == 0
        assert q_t.grad is None and k_t.grad is None


def test_dispatch_torch_backend_is_this_path_and_errors_are_the_references():
    q_s, k_s = qk(2, 2, 9, 4, torch.float32, False)
    mask = random_mask(2, 9)
    got = dispatch.attention_transfer(q_s, k_s, q_s.flip(0), k_s, mask, backend="torch", query_chunk=4)
    assert torch.equal(got, attention_transfer_torch(q_s, k_s, q_s.flip(0), k_s, mask, query_chunk=4))
    with pytest.raises(ValueError, match="attention kind"):
        attention_transfer_torch(q_s, k_s, q_s, k_s, mask, kind="cosine")
    with pytest.raises(ValueError, match="set relation_heads"):
        attention_transfer_torch(q_s, k_s, q_s[:, :1], k_s[:, :1], mask)
    with pytest.raises(ValueError, match="attention_mask must be"):
        attention_transfer_torch(q_s, k_s, q_s, k_s, mask[:, :3])

"""Float64 references and inputs shared by the attention-transfer tests (Triton kernel and torch path).

The reference keeps only each sequence's unpadded tokens (index select, no masking tricks), so
it shares no code with the implementations it checks.
"""
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def ref_split_heads(x: torch.Tensor, r: int) -> torch.Tensor:
    """Concatenate the heads of [B, H, L, d] per token, cut into r equal heads."""
    b, h, l, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, l, h * d).reshape(b, l, r, h * d // r).permute(0, 2, 1, 3)


def ref_attention_fp64(q_s, k_s, q_t, k_t, mask, kind, relation_heads):
    """Per sequence, keep only the unpadded tokens (index select, no masking tricks), in float64."""
    q_s, k_s, q_t, k_t = (x.double() for x in (q_s, k_s, q_t, k_t))
    if relation_heads:
        q_s, k_s, q_t, k_t = (ref_split_heads(x, relation_heads) for x in (q_s, k_s, q_t, k_t))
    heads = q_s.shape[1]
    total = q_s.new_zeros(())
    norm = 0.0
    for b in range(q_s.shape[0]):
        idx = mask[b].nonzero().flatten().to(q_s.device)
        n = idx.numel()
        norm += n if kind == "kl" else n * n
        if n == 0:
            continue
        s_s = q_s[b][:, idx] @ k_s[b][:, idx].transpose(-1, -2) / q_s.shape[-1] ** 0.5
        s_t = q_t[b][:, idx] @ k_t[b][:, idx].transpose(-1, -2) / q_t.shape[-1] ** 0.5
        if kind == "kl":
            logp_t = torch.log_softmax(s_t, -1)  # not log(softmax): p_t may underflow to 0
            total = total + (logp_t.exp() * (logp_t - torch.log_softmax(s_s, -1))).sum()
        else:
            total = total + ((s_s - s_t) ** 2).sum()
    return total / max(norm * heads, 1.0)


def ref_soft_label_fp64(s, t, temperature):
    s = s.double().reshape(-1, s.shape[-1]) / temperature
    t = t.double().reshape(-1, t.shape[-1]) / temperature
    logp_t = torch.log_softmax(t, -1)
    return (logp_t.exp() * (logp_t - torch.log_softmax(s, -1))).sum(-1).mean() * temperature ** 2


# --------------------------------------------------------------------------- inputs
def random_mask(batch: int, length: int) -> torch.Tensor:
    """Mixed padding: one full row, right padding, a random hole pattern, one fully padded sequence."""
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1:
        mask[1, torch.randint(2, length - 1, ()).item():] = 0
    if batch > 2:
        mask[2] = (torch.rand(length) > 0.3).long()
        mask[2, 0] = 1
    if batch > 3:
        mask[3] = 0
    return mask.to(DEVICE)


def qk(batch, heads, length, d, dtype, grad, hf_layout=False):
    """Q and K [B, H, L, d]; hf_layout: non-contiguous views of [B, L, H, d] as attention layers make them."""
    if hf_layout:
        return [(torch.randn(batch, length, heads, d, device=DEVICE) * 1.5).to(dtype).transpose(1, 2)
                for _ in range(2)]
    return [(torch.randn(batch, heads, length, d, device=DEVICE) * 1.5).to(dtype).requires_grad_(grad)
            for _ in range(2)]


def assert_matches_reference(out, q_s, k_s, q_t, k_t, mask, kind, relation_heads, tol) -> None:
    """`out` (already backpropagated into q_s/k_s) equals the float64 reference in value and gradients;
    the fully padded sequence 3 of `random_mask` gets no gradient."""
    leaves = [x.detach().double().requires_grad_() for x in (q_s, k_s)]
    want = ref_attention_fp64(*leaves, q_t, k_t, mask, kind, relation_heads)
    want.backward()
    assert abs(out.item() - want.item()) <= tol * abs(want.item()), (out.item(), want.item())
    assert rel(q_s.grad, leaves[0].grad) <= tol
    assert rel(k_s.grad, leaves[1].grad) <= tol
    assert q_s.grad[3].abs().max() == 0 and k_s.grad[3].abs().max() == 0

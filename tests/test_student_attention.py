"""The student's attention with its head dim zero-padded to a multiple of 8 (what CUDA's fused SDPA
kernels need; ERNIE-Tiny's heads are 26 wide) computes what plain attention computes, forward and
backward, and leaves the saved model a plain one.

References are float64 (a hand-written softmax attention, and transformers' eager attention), on fresh
random inputs with padded positions, so a dropped or misplaced mask shows too.
"""
import copy
import json

import pytest
import torch
import transformers

from ernie_tiny_ds.config import StudentConfig
from ernie_tiny_ds.distill import models
from ernie_tiny_ds.distill.models import FeatureCapture, build_student

HEAD = 26  # ERNIE-Tiny's 312 / 12
TEACHER = transformers.BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
SMALL_STUDENT = StudentConfig(num_hidden_layers=2, hidden_size=2 * HEAD, num_attention_heads=2, intermediate_size=48)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def padding_mask(batch: int, length: int) -> torch.Tensor:
    """[B, L] of 1 = token: row 0 full, the others cut at random lengths (at least 2 tokens)."""
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        mask[row, torch.randint(2, length, ()).item():] = 0
    assert mask.sum() < mask.numel()
    return mask


def reference_attention(q, k, v, mask):
    scores = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask[:, None, None, :].bool(), float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v.double()).transpose(1, 2)  # [B, L, H, d] as transformers returns


def test_padded_heads_give_plain_attention_forward_and_backward():
    torch.manual_seed(torch.seed())  # fresh inputs every run
    mask = padding_mask(3, 13)
    leaves = [torch.randn(3, 4, 13, HEAD, requires_grad=True) for _ in range(3)]
    reference_leaves = [t.detach().double().requires_grad_() for t in leaves]
    weights = torch.randn(3, 13, 4, HEAD, dtype=torch.float64)  # a loss that reaches every output value

    module = torch.nn.Module()
    module.is_causal = False
    padded, _ = models.padded_head_sdpa(module, *leaves, mask.bool()[:, None, None, :], scaling=HEAD ** -0.5)
    want = reference_attention(*reference_leaves, mask)
    assert padded.shape == want.shape == (3, 13, 4, HEAD)
    (padded.double() * weights).sum().backward()
    (want * weights).sum().backward()
    assert rel(padded, want) < 1e-6, rel(padded, want)
    for got, expected, name in zip(leaves, reference_leaves, "qkv"):
        assert rel(got.grad, expected.grad) < 1e-5, (name, rel(got.grad, expected.grad))


def test_padded_heads_default_to_the_unpadded_scale():
    """Without an explicit scale SDPA would use 1/sqrt(32): the padded path must keep 1/sqrt(26)."""
    q, k, v = (torch.randn(2, 2, 7, HEAD) * 3 for _ in range(3))
    module = torch.nn.Module()
    module.is_causal = False
    mask = torch.ones(2, 7, dtype=torch.long)
    got, _ = models.padded_head_sdpa(module, q, k, v, None)
    assert rel(got, reference_attention(q, k, v, mask)) < 1e-6


@pytest.fixture
def padded_everywhere(monkeypatch):
    """The student's padded path on the CPU (it pads on CUDA only); records the head dims SDPA saw."""
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(query, *args, **kwargs):
        seen.append(query.shape[-1])
        return real(query, *args, **kwargs)

    monkeypatch.setattr(models, "pads_heads_on", lambda device: True)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return seen


def student_and_float64_eager_copy():
    student = build_student(SMALL_STUDENT, TEACHER, seed=int(torch.randint(0, 2 ** 31, ())))
    with torch.no_grad():  # random biases and LayerNorms too (they start at 0 and 1)
        for parameter in student.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    reference = copy.deepcopy(student).double()
    reference.set_attn_implementation("eager")
    return student.train(), reference.train()


def test_the_padded_student_matches_a_float64_eager_student(padded_everywhere):
    torch.manual_seed(torch.seed())
    student, reference = student_and_float64_eager_copy()
    assert student.config._attn_implementation == models.STUDENT_ATTENTION
    ids = torch.randint(5, 97, (4, 15))
    mask = padding_mask(4, 15)
    capture = FeatureCapture(student)
    weights = torch.randn(4, 15, 2 * HEAD, dtype=torch.float64) * mask[..., None]  # valid tokens only
    with capture.recording() as features:
        got = student(input_ids=ids, attention_mask=mask).last_hidden_state
    want = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    (got.double() * weights).sum().backward()
    (want * weights).sum().backward()

    assert padded_everywhere == [32, 32]  # both layers ran SDPA on 26 padded to 32
    assert features.q[1].shape == features.k[2].shape == (4, 2, 15, HEAD)  # the losses see unpadded Q/K
    valid = mask.bool()
    assert rel(got[valid], want[valid]) < 1e-5, rel(got[valid], want[valid])
    for (name, p), (_, p_ref) in zip(student.named_parameters(), reference.named_parameters()):
        # the key bias has no gradient: it adds one constant to every score of a query row
        if any(part in name for part in (".query.", ".key.weight", ".value.")):
            assert rel(p.grad, p_ref.grad) < 1e-4, (name, rel(p.grad, p_ref.grad))


def test_on_the_cpu_the_student_runs_plain_sdpa():
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(query, *args, **kwargs):
        seen.append(query.shape[-1])
        return real(query, *args, **kwargs)

    student = build_student(SMALL_STUDENT, TEACHER, seed=0).eval()
    torch.nn.functional.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            student(input_ids=torch.randint(5, 97, (2, 9)), attention_mask=padding_mask(2, 9))
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
    assert seen == [HEAD, HEAD]


def test_a_saved_student_is_a_plain_model(tmp_path):
    """The attention choice lives on the in-memory config only: the folder loads in plain transformers
    with every weight, and computes what the student computed."""
    student = build_student(SMALL_STUDENT, TEACHER, seed=3, num_labels=3).eval()
    student.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert models.STUDENT_ATTENTION not in json.dumps(saved)
    loaded, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path, attn_implementation="sdpa", output_loading_info=True)
    assert not any(info.values()), info
    ids, mask = torch.randint(5, 97, (2, 9)), padding_mask(2, 9)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=ids, attention_mask=mask).logits,
                           student(input_ids=ids, attention_mask=mask).logits)

"""Each loss against an independent float64 computation on fresh random inputs."""
import math

import pytest
import torch

from ernie_tiny_ds import losses as L


def random_mask(b, l):
    """Padding at the end of some rows, one row fully padded, odd lengths."""
    lengths = torch.randint(1, l + 1, (b,))
    lengths[0] = l
    if b > 2:
        lengths[-1] = 0
    return (torch.arange(l)[None, :] < lengths[:, None]).long()


def ref_attention(q_s, k_s, q_t, k_t, mask, kind):
    """float64 loops: per (batch, head, valid query row)."""
    q_s, k_s, q_t, k_t = (x.double() for x in (q_s, k_s, q_t, k_t))
    b, h, l, _ = q_s.shape
    total, count = 0.0, 0
    for bi in range(b):
        keys = mask[bi].bool()
        n = int(keys.sum())
        for hi in range(h):
            for qi in range(l):
                if not keys[qi]:
                    continue
                ss = (k_s[bi, hi][keys] @ q_s[bi, hi, qi]) / math.sqrt(q_s.shape[-1])
                st = (k_t[bi, hi][keys] @ q_t[bi, hi, qi]) / math.sqrt(q_t.shape[-1])
                if kind == "kl":
                    pt = torch.softmax(st, 0)
                    total += float((pt * (torch.log(pt) - torch.log_softmax(ss, 0))).sum())
                    count += 1
                else:
                    total += float(((ss - st) ** 2).sum())
                    count += n
    return total / max(count, 1)


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_attention_transfer_matches_float64(kind):
    b, h, l = 3, 2, 7
    q_s, k_s = torch.randn(b, h, l, 5), torch.randn(b, h, l, 5)
    q_t, k_t = torch.randn(b, h, l, 8), torch.randn(b, h, l, 8)
    mask = random_mask(b, l)
    got = L.attention_transfer_loss(q_s, k_s, q_t, k_t, mask, kind=kind)
    assert got.dim() == 0
    assert got.item() == pytest.approx(ref_attention(q_s, k_s, q_t, k_t, mask, kind), rel=1e-5)


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_attention_transfer_query_chunks_equal_whole(kind):
    q_s, k_s, q_t, k_t = (torch.randn(2, 3, 11, 4) for _ in range(4))
    mask = random_mask(2, 11)
    whole = L.attention_transfer_loss(q_s, k_s, q_t, k_t, mask, kind=kind)
    chunked = L.attention_transfer_loss(q_s, k_s, q_t, k_t, mask, kind=kind, query_chunk=3)
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-6)


def test_relation_heads_resplit_concatenated_qk():
    """Student 4 heads x 6, teacher 2 heads x 8, both re-split into 2 relation heads."""
    b, l = 2, 6
    q_s, k_s = torch.randn(b, 4, l, 6), torch.randn(b, 4, l, 6)
    q_t, k_t = torch.randn(b, 2, l, 8), torch.randn(b, 2, l, 8)
    mask = random_mask(b, l)
    got = L.attention_transfer_loss(q_s, k_s, q_t, k_t, mask, kind="kl", relation_heads=2)

    def resplit(x, r):  # [B,H,L,d] -> concat heads [B,L,H*d] -> R heads
        bb, hh, ll, dd = x.shape
        return x.permute(0, 2, 1, 3).reshape(bb, ll, r, hh * dd // r).permute(0, 2, 1, 3)
    want = ref_attention(resplit(q_s, 2), resplit(k_s, 2), resplit(q_t, 2), resplit(k_t, 2), mask, "kl")
    assert got.item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="relation_heads"):
        L.attention_transfer_loss(q_s, k_s, q_t, k_t, mask)


def test_attention_kl_is_zero_for_identical_and_gradient_flows_to_student_only():
    q, k = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    mask = random_mask(2, 5)
    assert L.attention_transfer_loss(q, k, q, k, mask).item() == pytest.approx(0.0, abs=1e-6)
    q_s = torch.randn(2, 2, 5, 4, requires_grad=True)
    q_t = torch.randn(2, 2, 5, 4)
    L.attention_transfer_loss(q_s, k, q_t, k, mask).backward()
    assert q_s.grad is not None and torch.isfinite(q_s.grad).all() and q_s.grad.abs().sum() > 0


def test_hidden_mse_matches_float64_with_padding():
    s, t = torch.randn(3, 9, 16), torch.randn(3, 9, 16)
    mask = random_mask(3, 9)
    got = L.hidden_mse_loss(s, t, mask)
    sd, td = s.double(), t.double()
    per_tok = ((sd - td) ** 2).mean(-1)
    want = float((per_tok * mask).sum() / mask.sum())
    assert got.item() == pytest.approx(want, rel=1e-6)
    assert L.hidden_mse_loss(s, t).item() == pytest.approx(float(per_tok.mean()), rel=1e-6)


@pytest.mark.parametrize("classes,temperature", [(2, 1.0), (7, 2.5), (30522, 4.0)])
def test_soft_label_matches_float64(classes, temperature):
    s, t = torch.randn(5, classes) * 3, torch.randn(5, classes) * 3
    got = L.soft_label_loss(s, t, temperature)
    sd, td = s.double() / temperature, t.double() / temperature
    pt = torch.softmax(td, -1)
    want = float((pt * (torch.log(pt) - torch.log_softmax(sd, -1))).sum(-1).mean() * temperature ** 2)
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_hard_label_cross_entropy_and_regression():
    logits, labels = torch.randn(6, 3), torch.randint(0, 3, (6,))
    want = float(-torch.log_softmax(logits.double(), -1)[torch.arange(6), labels].mean())
    assert L.hard_label_loss(logits, labels).item() == pytest.approx(want, rel=1e-6)
    pred, gold = torch.randn(6, 1), torch.randn(6)
    assert L.hard_label_loss(pred, gold).item() == pytest.approx(
        float(((pred.double()[:, 0] - gold.double()) ** 2).mean()), rel=1e-6)


def test_layer_maps():
    assert L.layer_map(12, 4) == [3, 6, 9, 12]
    assert L.layer_map(12, 4, "last-k") == [9, 10, 11, 12]
    assert L.layer_map(6, 3) == [2, 4, 6]
    assert L.layer_map(12, 4, [1, 2, 3, 12]) == [1, 2, 3, 12]
    with pytest.raises(ValueError, match="outside"):
        L.layer_map(12, 4, [1, 2, 3, 13])
    with pytest.raises(ValueError, match="lists 3"):
        L.layer_map(12, 4, [1, 2, 3])


def test_regression_soft_label_is_the_output_mse_and_teaches():
    s, t = torch.randn(6, 1, requires_grad=True), torch.randn(6, 1)
    got = L.regression_soft_label_loss(s, t)
    assert got.item() == pytest.approx(float(((s.double() - t.double()) ** 2).mean()), rel=1e-6)
    got.backward()
    assert s.grad.abs().sum() > 0
    # a KL over one output is always 0: it is not what a regression stage may train on
    assert L.soft_label_loss(s.detach(), t, 1.0).item() == 0.0


def test_a_regression_student_learns_from_the_teachers_outputs():
    """Stage 4 on a one-output head: the soft-label term is non-zero and moves the student's head."""
    import transformers

    from ernie_tiny_ds.config import LossConfig
    from ernie_tiny_ds.distill.loss_terms import stage_terms
    from ernie_tiny_ds.distill.models import Features
    from ernie_tiny_ds.distill.objective import DistillationObjective, TeacherOutput
    from ernie_tiny_ds.stages import STAGE_SPECS

    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, num_labels=1, hidden_dropout_prob=0.0)
    student = transformers.BertForSequenceClassification(cfg)
    weights = LossConfig(weights={"hidden": 0, "embedding": 0, "attention": 0, "hard_label": 0})
    objective = DistillationObjective(student, 16, [1], weights,
                                      terms=stage_terms(STAGE_SPECS["task_specific"]))
    ids = torch.randint(1, 50, (4, 6))
    teacher = TeacherOutput(Features(), torch.randn(4, 1) * 2)
    total, terms = objective(ids, torch.ones_like(ids), torch.zeros_like(ids), teacher, torch.randn(4))
    with torch.no_grad():
        mine = student(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert terms["soft_label"].item() == pytest.approx(float(((mine.double() - teacher.logits.double()) ** 2).mean()),
                                                       rel=1e-5)
    total.backward()
    assert student.classifier.weight.grad.abs().sum() > 0

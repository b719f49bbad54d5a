"""runtime/flops.py: the FLOP count of a step against a hand count and torch's own FLOP counter,
and the peak rate behind MFU (table, measured, recipe override)."""
import json
import random
from types import SimpleNamespace

import pytest
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

from ernie_tiny_ds.config import LossConfig
from ernie_tiny_ds.distill.loss_terms import stage_terms
from ernie_tiny_ds.distill.models import encoder_up_to
from ernie_tiny_ds.distill.objective import DistillationObjective
from ernie_tiny_ds.runtime import flops
from ernie_tiny_ds.stages import STAGE_SPECS


def bert_config(hidden=16, layers=2, heads=2, ffn=24, labels=2):
    return transformers.BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=layers,
                                   num_attention_heads=heads, intermediate_size=ffn, max_position_embeddings=64,
                                   num_labels=labels)


def counted(fn) -> int:
    """FLOPs torch's FlopCounterMode sees (matrix products) while fn runs."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_encoder_forward_flops_is_the_hand_count():
    # h=8, f=16, 2 layers, B=2, L=5: per layer 2*10*(4*64 + 2*128) + 2*2*2*25*8 = 10240 + 1600
    cfg = bert_config(hidden=8, ffn=16, layers=3)
    assert flops.encoder_forward_flops(cfg, batch=2, seq_len=5, layers=2) == 2 * (10240 + 1600)
    # pooler 2*B*h*h and a 3-class head 2*B*h*3 on top of all 3 layers
    assert flops.encoder_forward_flops(cfg, 2, 5, pooler=True, classes=3) == 3 * 11840 + 256 + 96


@pytest.mark.parametrize("head", [False, True])
def test_model_forward_and_backward_match_torch_flop_counter(head):
    batch, length = random.randint(1, 4), random.randint(3, 12)
    cfg = bert_config(hidden=random.choice([8, 16]), ffn=random.choice([12, 24]), labels=random.randint(1, 4))
    auto = transformers.AutoModelForSequenceClassification if head else transformers.AutoModel
    model = auto.from_config(cfg, attn_implementation="eager")  # eager: the attention products are visible bmms
    ids = torch.randint(0, 100, (batch, length))
    want = flops.model_forward_flops(model, batch, length)
    assert counted(lambda: model(input_ids=ids)) == want
    # backward = 2 x forward: every product gets a gradient for its input and its weight
    # (every output in the loss, so the pooler is part of the backward too)
    assert counted(lambda: sum(o.sum() for o in model(input_ids=ids).to_tuple()).backward()) == \
        flops.finetune_step_flops(model, batch, length)


def test_a_truncated_teacher_counts_only_the_layers_it_runs():
    teacher = transformers.AutoModel.from_config(bert_config(layers=4), attn_implementation="eager")
    full = flops.model_forward_flops(teacher, 2, 6)
    cut = encoder_up_to(teacher, 2)  # also drops the pooler
    assert flops.model_forward_flops(cut, 2, 6) == flops.encoder_forward_flops(teacher.config, 2, 6, layers=2)
    assert flops.model_forward_flops(cut, 2, 6) < full


def test_distill_step_is_teacher_forward_plus_three_student_forwards_with_projections():
    teacher = encoder_up_to(transformers.AutoModel.from_config(bert_config(hidden=16, layers=4)), 4)
    student = transformers.AutoModel.from_config(bert_config(hidden=8, layers=2, heads=2, ffn=12))
    mapping = [2, 4]
    objective = DistillationObjective(student, 16, mapping, LossConfig(), terms=stage_terms(STAGE_SPECS["general"]))
    parts = SimpleNamespace(teacher=teacher, student=student, objective=objective, mapping=mapping)
    b, length = 3, 7
    # embedding projection once, hidden projection per mapped layer: 2*B*L*8*16 each
    projections = 3 * 2 * b * length * 8 * 16
    want = (flops.encoder_forward_flops(teacher.config, b, length)
            + 3 * (flops.encoder_forward_flops(student.config, b, length, pooler=True) + projections))
    assert flops.distill_step_flops(parts, b, length) == want
    # a switched-off term applies no projection
    objective.cfg = LossConfig(weights={"hidden": 0.0})
    assert flops.distill_step_flops(parts, b, length) == want - 3 * 2 * 2 * b * length * 8 * 16


@pytest.mark.parametrize("name, precision, tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989), ("NVIDIA H200", "bf16", 989), ("NVIDIA H100 PCIe", "bf16", 756),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312), ("NVIDIA A100 80GB PCIe", "fp32", 19.5), ("NVIDIA L40S", "fp16", 362),
    ("NVIDIA A10", "bf16", 125), ("Tesla V100-SXM2-32GB", "fp16", 125), ("Tesla T4", "fp16", 65),
    ("NVIDIA H100 80GB HBM3", "fp32", 67)])
def test_peak_table_by_device_name(name, precision, tflops):
    assert flops.table_peak_flops(name, precision) == pytest.approx(tflops * 1e12)


def test_unknown_gpus_are_not_guessed():
    assert flops.table_peak_flops("NVIDIA A10G", "bf16") is None  # not an A10
    assert flops.table_peak_flops("Some Future GPU", "fp32") is None


def test_peak_on_cpu_is_measured_once_and_the_recipe_wins():
    cpu = torch.device("cpu")
    flops.measured_matmul_flops.cache_clear()
    rng = torch.get_rng_state()
    measured = flops.peak_flops(cpu, "fp32")
    assert torch.equal(torch.get_rng_state(), rng)  # no draw from the RNG that dropout and resume rely on
    assert measured > 1e8
    assert flops.peak_flops(cpu, "fp32") == measured  # cached: measured once per process
    assert flops.peak_flops(cpu, "fp32", override_tflops=2.5) == 2.5e12


def test_the_peak_is_kept_per_machine_and_only_a_better_reading_replaces_it(tmp_path, monkeypatch):
    """The first run on a machine times five loops; later ones time one and keep the best ever measured,
    so a reading taken under load lasts until the next quiet one, not for a whole run."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cache = tmp_path / "cache/ernie-tiny-ds/matmul_peak.json"
    loops_asked, readings = [], iter([3e10, 1e10, 5e10])  # a first reading, a loaded one, a quiet one
    monkeypatch.setattr(flops, "_matmul_rate", lambda a, b, loops: loops_asked.append(loops) or next(readings))

    def probe() -> float:
        flops.measured_matmul_flops.cache_clear()  # a new process
        return flops.measured_matmul_flops("cpu", torch.float32)

    assert probe() == 3e10 and loops_asked == [5]
    (key, kept), = json.loads(cache.read_text()).items()
    assert kept == 3e10 and "float32" in key and f"{torch.get_num_threads()} threads" in key
    assert probe() == 3e10 and loops_asked == [5, 1]  # the loaded reading neither counts nor is written
    assert json.loads(cache.read_text()) == {key: 3e10}
    assert probe() == 5e10 and json.loads(cache.read_text()) == {key: 5e10}
    # a damaged cache file is measured afresh (five loops) and rewritten whole
    cache.write_text("{not json")
    monkeypatch.setattr(flops, "_matmul_rate", lambda a, b, loops: loops_asked.append(loops) or 4e10)
    assert probe() == 4e10 and loops_asked[-1] == 5 and json.loads(cache.read_text()) == {key: 4e10}
    # another dtype is another entry
    flops.measured_matmul_flops.cache_clear()
    flops.measured_matmul_flops("cpu", torch.bfloat16)
    assert len(json.loads(cache.read_text())) == 2
    flops.measured_matmul_flops.cache_clear()


def test_an_unwritable_cache_folder_still_gives_the_measured_peak(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # a file where the folder would go
    monkeypatch.setattr(flops, "_matmul_rate", lambda a, b, loops: 2e10)
    flops.measured_matmul_flops.cache_clear()
    assert flops.measured_matmul_flops("cpu", torch.float32) == 2e10
    flops.measured_matmul_flops.cache_clear()

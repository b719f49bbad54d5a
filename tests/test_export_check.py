"""The end-of-stage export check (runtime/export_check.py): a healthy bf16/fp16 student passes it,
though its last hidden state differs from the fp32 export by far more than a fixed 5e-2 when its
magnitudes are a trained model's; a corrupted export fails it in every precision, in one line."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers

from ernie_tiny_ds.errors import UserError
from ernie_tiny_ds.runtime.export_check import ROUNDING_RUN, ExportMismatch, check_export, export_matches

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OLD_16BIT_TOLERANCE = 5e-2  # the fixed max-abs bound the check used before, for 16-bit runs


def fresh_seed() -> int:
    return int(torch.seed() % 2**31)


def demo_shape_model(seed: int, layers: int = 4) -> transformers.BertModel:
    """The demo student's shape (recipes/demo.yaml) with a trained model's output magnitudes: the last
    LayerNorm scaled so max |h| is 10-20, and sharper attention (queries x3) than a fresh init."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=2000, hidden_size=312, num_hidden_layers=layers, num_attention_heads=12,
                                     intermediate_size=1200, max_position_embeddings=128)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():
        model.encoder.layer[-1].output.LayerNorm.weight.mul_(3.75)
        for layer in model.encoder.layer:
            layer.attention.self.query.weight.mul_(3.0)
    return model


def probe_batch(seed: int, rows: int = 8, length: int = 64) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 2000, (rows, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, length // 2:] = 0  # one padded sentence, as in a real probe
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def outputs(model, batch: dict, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(model).to(dtype)(**batch).last_hidden_state.float()


def engine_outputs(model, batch: dict, precision: str) -> torch.Tensor:
    """The same weights run as another device would: in `precision`, with other attention kernels
    (eager instead of SDPA; they differ from each other about as much as each differs from exact)."""
    engine = copy.deepcopy(model)
    engine.config._attn_implementation = "eager"
    return outputs(engine, batch, DTYPES[precision])


def judge(engine: torch.Tensor, export_model, batch: dict, precision: str):
    """What check_export does with a loaded export: run it in fp32 and in the precision's rounding run."""
    return export_matches(engine, outputs(export_model, batch), outputs(export_model, batch, ROUNDING_RUN[precision]),
                          precision)


@pytest.fixture(scope="module")
def healthy():
    seed = fresh_seed()
    model, batch = demo_shape_model(seed), probe_batch(seed)
    return seed, model, batch, outputs(model, batch)


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_a_healthy_run_passes_in_every_precision(healthy, precision):
    seed, model, batch, export = healthy
    engine = engine_outputs(model, batch, precision)
    assert not torch.equal(engine, outputs(model, batch, ROUNDING_RUN[precision]))  # not the check's own run
    check = judge(engine, model, batch, precision)
    assert check.ok, (seed, check.explanation)
    # another device's rounding: far from the bound
    assert check.measured <= check.allowed / 2, (seed, check.explanation)
    assert check.max_abs_diff == pytest.approx(float((engine - export).abs().max()))


def test_the_fixed_tolerance_failed_a_healthy_bf16_run(healthy):
    """bf16's step is 0.0625 between 8 and 16: max |h| of a trained model takes one healthy run past 5e-2."""
    seed, model, batch, export = healthy
    assert 10 <= export.abs().max() <= 25, seed  # a trained model's outlier dimensions
    check = judge(engine_outputs(model, batch, "bf16"), model, batch, "bf16")
    assert check.ok and check.max_abs_diff > OLD_16BIT_TOLERANCE, (seed, check.explanation)


def zero_one_ffn(model):
    model.encoder.layer[2].output.dense.weight.zero_()


def swap_two_layers(model):
    first, second = model.encoder.layer[0], model.encoder.layer[-1]
    state = copy.deepcopy(first.state_dict())
    first.load_state_dict(second.state_dict())
    second.load_state_dict(state)


def reinitialise_one_matrix(model):
    weight = model.encoder.layer[0].intermediate.dense.weight
    weight.copy_(torch.randn_like(weight) * weight.std())


CORRUPTIONS = {"zeroed FFN": zero_one_ffn, "swapped layers": swap_two_layers,
               "re-initialised matrix": reinitialise_one_matrix}


def corrupted(model, corruption):
    broken = copy.deepcopy(model)
    with torch.no_grad():
        CORRUPTIONS[corruption](broken)
    return broken


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_corrupted_export_fails_in_every_precision(healthy, precision, corruption):
    seed, model, batch, _ = healthy
    check = judge(engine_outputs(model, batch, precision), corrupted(model, corruption), batch, precision)
    assert not check.ok, (seed, check.explanation)
    assert check.measured > 2 * check.allowed, (seed, check.explanation)  # not a near miss


def test_fp32_catches_one_percent_noise_on_one_matrix(healthy):
    seed, model, batch, _ = healthy
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        weight = noisy.encoder.layer[3].attention.output.dense.weight
        weight.add_(0.01 * weight.std() * torch.randn_like(weight))
    check = judge(engine_outputs(model, batch, "fp32"), noisy, batch, "fp32")
    assert not check.ok, (seed, check.explanation)


def test_non_finite_or_misshapen_exports_fail(healthy):
    _, model, batch, export = healthy
    rounded = outputs(model, batch, torch.bfloat16)
    poisoned = export.clone()
    poisoned[0, 3, 7] = float("nan")
    assert not export_matches(rounded, poisoned, rounded, "bf16").ok
    assert not export_matches(rounded, export[:, :-1], rounded[:, :-1], "bf16").ok
    overflowed = rounded.clone()  # a rounding run that overflowed (fp16) leaves the floor, not no bound
    for value in (float("inf"), float("nan")):
        overflowed[0, 3, 7] = value
        assert export_matches(rounded, export, overflowed, "bf16").allowed == 2 * torch.finfo(torch.bfloat16).eps


@pytest.mark.slow
def test_the_stage_check_records_its_bound_and_fails_in_one_line(healthy, tmp_path):
    """What finish_stage runs on rank 0: the export folder loaded fresh against the engine's outputs."""
    seed, model, batch, _ = healthy
    engine = engine_outputs(model, batch, "bf16")
    model.save_pretrained(tmp_path / "student")
    record = check_export(tmp_path / "student", batch, engine, "bf16")
    assert record["export_error"] <= record["export_error_allowed"], (seed, record)
    assert record["export_max_abs_diff"] > OLD_16BIT_TOLERANCE, (seed, record)
    corrupted(model, "swapped layers").save_pretrained(tmp_path / "broken")
    with pytest.raises(ExportMismatch) as failure:
        check_export(tmp_path / "broken", batch, engine, "bf16")
    line = str(failure.value)
    assert isinstance(failure.value, UserError)  # the CLI prints it as one line and exits 2
    assert "\n" not in line and str(tmp_path / "broken") in line, line
    expected = judge(engine, corrupted(model, "swapped layers"), batch, "bf16")
    assert f"differs by {expected.measured:.3g}" in line and f"bound {expected.allowed:.3g}" in line, line


def demo_batches(folder, tokenizer_dir: str, rows: int, length: int) -> list[dict]:
    from distributed import write_corpus
    corpus = write_corpus(folder, documents=96)
    texts = [line for part in sorted(corpus.glob("*.txt")) for line in part.read_text().splitlines()]
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return [{k: encoded[k][i:i + rows] for k in ("input_ids", "attention_mask", "token_type_ids")}
            for i in range(0, len(texts) - rows + 1, rows)]


@pytest.mark.slow
def test_a_demo_student_trained_in_bf16_for_a_full_stage_passes(tmp_path, tokenizer_dir, vocab_size):
    """The demo's student shape, stage length and rate, trained as DeepSpeed's bf16 engine trains: fp32
    master weights updated by AdamW, a bf16 copy that runs forward and backward. Batches are smaller
    (4 x 32 tokens) to keep it cheap; the teacher is a small fixed one, distilled layer by layer."""
    from distributed import tiny_teacher

    from ernie_tiny_ds.config import load_recipe
    from ernie_tiny_ds.distill.models import build_student
    from ernie_tiny_ds.runtime.export import model_outputs

    recipe = load_recipe("demo", [f"teacher.config={json.dumps(tiny_teacher(vocab_size))}"]).for_stage("general")
    steps, warmup = recipe.train.max_steps, max(1, round(recipe.optim.warmup_ratio * recipe.train.max_steps))
    assert (steps, recipe.student.hidden_size, recipe.student.num_hidden_layers) == (80, 312, 4)
    seed = fresh_seed()
    teacher = transformers.BertModel(transformers.BertConfig(**recipe.teacher.config), add_pooling_layer=False).eval()
    master = build_student(recipe.student, teacher.config, seed)  # fp32: what ZeRO keeps and the export holds
    engine = copy.deepcopy(master).to(torch.bfloat16).train()
    projection = torch.nn.Linear(recipe.student.hidden_size, teacher.config.hidden_size)
    optimizer = torch.optim.AdamW([*master.parameters(), *projection.parameters()], lr=recipe.optim.lr,
                                  fused=True)  # the unfused CPU step takes 10x longer
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    batches, losses = demo_batches(tmp_path / "corpus", tokenizer_dir, rows=4, length=32), []
    for step in range(steps):
        batch = batches[step % len(batches)]
        with torch.no_grad():
            targets = teacher(**batch, output_hidden_states=True).hidden_states
        states = engine(**batch, output_hidden_states=True).hidden_states
        loss = sum(torch.nn.functional.mse_loss(projection(s.float()), t) for s, t in zip(states, targets))
        loss.backward()
        for weight, rounded in zip(master.parameters(), engine.parameters()):
            weight.grad = None if rounded.grad is None else rounded.grad.float()  # the pooler has none
            rounded.grad = None
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        with torch.no_grad():
            for weight, rounded in zip(master.parameters(), engine.parameters()):
                rounded.copy_(weight)
        losses.append(loss.item())
    assert sum(losses[-8:]) < 0.8 * sum(losses[:8]), (seed, losses)  # it trained
    probe = {k: v[:2] for k, v in batch.items()}  # as finish_stage: two rows of the last batch
    engine.eval().config._attn_implementation = "eager"  # another device's attention kernels
    with torch.no_grad():
        expected = model_outputs(engine, probe).float()
    master.save_pretrained(tmp_path / "student")
    record = check_export(tmp_path / "student", probe, expected, "bf16")
    assert record["export_error"] <= record["export_error_allowed"] / 2, (seed, record)

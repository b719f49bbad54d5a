"""Task metrics against hand computations, evaluate_model on a saved model, the CLI, speed measurement."""
import json

import numpy as np
import pytest
import torch
import transformers
from distributed import run_cli

from ernie_tiny_ds.config import TaskConfig
from ernie_tiny_ds.data.benchmarks import compute_metrics
from ernie_tiny_ds.errors import ConfigError, UserError
from ernie_tiny_ds.workflows.evaluate import evaluate_model
from ernie_tiny_ds.workflows.speed import compare_inference, measure_inference


# --------------------------------------------------------------------------- metrics by hand
def confusion(labels, predictions, k):
    c = np.zeros((k, k))
    for t, p in zip(labels, predictions):
        c[t, p] += 1
    return c


def hand_mcc(c):
    s, correct = c.sum(), np.trace(c)
    t, p = c.sum(axis=1), c.sum(axis=0)
    return (correct * s - p @ t) / np.sqrt((s * s - p @ p) * (s * s - t @ t))


def hand_f1(c, k):
    f1 = [2 * c[i, i] / (c[i, :].sum() + c[:, i].sum()) if c[i, :].sum() + c[:, i].sum() else 0.0 for i in range(k)]
    return f1[1] if k == 2 else float(np.mean(f1))


def ranks(x):
    out = np.empty(len(x))
    out[np.argsort(x)] = np.arange(len(x))
    return out


def hand_classification(logits, labels):
    k = logits.shape[1]
    predictions = [max(range(k), key=lambda j: row[j]) for row in logits]
    c = confusion(labels, predictions, k)
    return {"accuracy": np.trace(c) / len(labels), "f1": hand_f1(c, k), "mcc": hand_mcc(c)}


def hand_regression(predictions, labels):
    pearson = np.corrcoef(predictions, labels)[0, 1]
    return {"pearson": pearson, "spearman": np.corrcoef(ranks(predictions), ranks(labels))[0, 1]}


@pytest.mark.parametrize("k", [2, 3, 5])
def test_classification_metrics_equal_a_hand_computation(k):
    rng = np.random.default_rng(k)
    labels = rng.integers(0, k, 200)
    logits = rng.normal(size=(200, k)) + 1.5 * np.eye(k)[labels] * (rng.random(200) < 0.5)[:, None]
    got = compute_metrics("classification", logits, labels)
    assert got == pytest.approx(hand_classification(logits, labels), abs=1e-12)
    assert 0.3 < got["accuracy"] < 0.95  # informative, not degenerate


def test_regression_metrics_equal_a_hand_computation():
    rng = np.random.default_rng(0)
    labels = rng.uniform(0, 5, 300)
    predictions = labels + rng.normal(scale=1.5, size=300)
    got = compute_metrics("regression", predictions[:, None], labels)
    assert got == pytest.approx(hand_regression(predictions, labels), abs=1e-12)
    constant = compute_metrics("regression", np.ones((300, 1)), labels)
    assert constant == {"pearson": None, "spearman": None}  # undefined correlation: null in JSON


# --------------------------------------------------------------------------- evaluate_model
SENTENCES = ["the old bridge was built near the river.", "children play in the green garden.",
             "a ship left the harbor in the morning.", "the king and queen travel north.",
             "music and story fill the village.", "the farm field is small.", "people find the stone road.",
             "winter came to the mountain forest."]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from ernie_tiny_ds.data.tokenizer import load_tokenizer
    return load_tokenizer(tokenizer_dir)


def save_model(folder, tokenizer, num_labels, head=True, id2label=None):
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                     num_labels=num_labels, initializer_range=0.5)  # outputs vary by input
    if id2label:
        config.id2label, config.label2id = dict(enumerate(id2label)), {n: i for i, n in enumerate(id2label)}
    torch.manual_seed(num_labels)
    model = (transformers.BertForSequenceClassification if head else transformers.BertModel)(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model.eval()


def task_files(tmp_path, kind):
    rng = np.random.default_rng(1)
    rows = []
    for i in range(24):
        a, b = SENTENCES[i % 8], SENTENCES[(i % 8 + 1 + i // 8) % 8]  # 24 distinct pairs: no tied predictions
        label = f"{rng.uniform(0, 5):.3f}" if kind == "regression" else ["no", "yes"][i % 3 == 0]
        rows.append(f"{a}\t{b}\t{label}\n")
    for split in ("train", "dev"):
        (tmp_path / f"{split}.tsv").write_text("first\tsecond\tlabel\n" + "".join(rows))
    return TaskConfig(name="toy", train_file=str(tmp_path / "train.tsv"), dev_file=str(tmp_path / "dev.tsv"),
                      text_columns=["first", "second"], type=kind, max_seq_len=64)


def by_hand(model, tokenizer, task_cfg):
    """One example at a time, no padding: logits independent of the batching code."""
    lines = open(task_cfg.dev_file).read().splitlines()[1:]
    logits, labels = [], []
    with torch.no_grad():
        for line in lines:
            a, b, label = line.split("\t")
            logits.append(model(**tokenizer(a, b, return_tensors="pt")).logits[0].numpy())
            labels.append(float(label) if task_cfg.type == "regression" else ["no", "yes"].index(label))
    return np.array(logits), np.array(labels)


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_evaluate_model_equals_hand_computation(tmp_path, tokenizer, kind):
    task_cfg = task_files(tmp_path, kind)
    model = save_model(tmp_path / "model", tokenizer, 1 if kind == "regression" else 2)
    got = evaluate_model(tmp_path / "model", task_cfg, batch_size=5)  # batches of mixed lengths, padded
    logits, labels = by_hand(model, tokenizer, task_cfg)
    expected = hand_regression(logits[:, 0], labels) if kind == "regression" else hand_classification(logits, labels)
    if kind == "classification":
        assert len(set(logits.argmax(1))) == 2  # both classes predicted: F1 and MCC are defined
    assert got.pop("examples") == 24
    assert got == pytest.approx(expected, abs=1e-5)


def test_models_that_do_not_fit_the_task_are_refused(tmp_path, tokenizer):
    task_cfg = task_files(tmp_path, "classification")
    save_model(tmp_path / "encoder", tokenizer, 2, head=False)
    with pytest.raises(UserError, match=r"has no sequence-classification head \(architectures: BertModel\)"):
        evaluate_model(tmp_path / "encoder", task_cfg)
    save_model(tmp_path / "three", tokenizer, 3)
    with pytest.raises(UserError, match=r"the model has 3 output\(s\), task 'toy' needs 2 \(classification: no, yes\)"):
        evaluate_model(tmp_path / "three", task_cfg)
    save_model(tmp_path / "swapped", tokenizer, 2, id2label=["yes", "no"])
    with pytest.raises(UserError, match=r"the model's labels \['yes', 'no'\] differ from the task's \['no', 'yes'\]"):
        evaluate_model(tmp_path / "swapped", task_cfg)
    with pytest.raises(UserError, match="is not a Hugging Face model folder"):
        evaluate_model(tmp_path, task_cfg)
    save_model(tmp_path / "fits", tokenizer, 2)
    task_cfg.dev_file = None
    with pytest.raises(ConfigError, match="task.dev_file: task 'toy' has no dev split to evaluate on"):
        evaluate_model(tmp_path / "fits", task_cfg)


@pytest.mark.slow
def test_cli_prints_and_writes_metrics_and_reports_bad_data(tmp_path, tokenizer, capsys):
    from ernie_tiny_ds.cli import main

    task_cfg = task_files(tmp_path, "classification")
    save_model(tmp_path / "model", tokenizer, 2, id2label=["no", "yes"])
    overrides = [f"task.train_file={task_cfg.train_file}", f"task.dev_file={task_cfg.dev_file}",
                 "task.text_columns=[first, second]", "task.max_seq_len=64"]
    args = ["evaluate", "--model", str(tmp_path / "model"), "--task", "toy", "--output", str(tmp_path / "m.json")]
    assert main(args + overrides) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = evaluate_model(tmp_path / "model", task_cfg)
    assert {k: printed[k] for k in expected} == expected and printed["task"] == "toy"
    assert json.loads((tmp_path / "m.json").read_text()) == printed
    (tmp_path / "dev.tsv").write_text("first\tsecond\tlabel\na\tb\tyes\nc\td\tmaybe\n")
    proc = run_cli(args + overrides)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (f"error: {tmp_path / 'dev.tsv'}:3: unknown label 'maybe'; "
                                                    f"the task's labels are no, yes")


# --------------------------------------------------------------------------- speed
def test_speed_measurement_reports_sane_numbers_and_restores_state(tmp_path, tokenizer):
    big = save_model(tmp_path / "big", tokenizer, 2)
    small = transformers.BertModel(transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=16,
                                                           num_hidden_layers=1, num_attention_heads=2,
                                                           intermediate_size=32, max_position_embeddings=64))
    small.train()
    threads = torch.get_num_threads()
    result = measure_inference(small, seq_len=16, repeats=3, warmup=1, threads=1)
    assert result["params"] == sum(p.numel() for p in small.parameters())
    assert result["latency_ms_batch1"] > 0 and result["throughput_batch32"] > 0 and result["threads"] == 1
    assert small.training and torch.get_num_threads() == threads  # caller's mode and threads restored
    report = compare_inference(tmp_path / "big", small, seq_len=16, repeats=3, warmup=1)
    assert report["teacher"]["params"] == sum(p.numel() for p in big.parameters())
    assert report["compression"] == report["teacher"]["params"] / report["student"]["params"]
    assert report["speedup_latency"] == pytest.approx(report["teacher"]["latency_ms_batch1"]
                                                      / report["student"]["latency_ms_batch1"])
    assert report["teacher"]["threads"] == report["student"]["threads"] == threads
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings"):
        measure_inference(small, seq_len=65)


def test_teacher_and_student_are_timed_in_turns(tokenizer):
    """A slow spell of a shared machine must hit both models alike: their repetitions alternate."""
    def tiny(layers):
        return transformers.BertModel(transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=16,
                                                              num_hidden_layers=layers, num_attention_heads=2,
                                                              intermediate_size=32, max_position_embeddings=32))
    teacher, student = tiny(2), tiny(1)
    order = []
    teacher.register_forward_hook(lambda *_: order.append("t"))
    student.register_forward_hook(lambda *_: order.append("s"))
    report = compare_inference(teacher, student, seq_len=8, repeats=4, warmup=1)
    assert order == ["t", "s"] * (2 * (1 + 4))  # latency then throughput: warm-up and repeats, alternating
    assert report["speedup_latency"] > 0 and report["speedup_throughput"] > 0

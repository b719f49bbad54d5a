"""A student that gives every dev row one answer is named as such: in report.json, report.md and
`evaluate`'s output, with the word "constant" and the likely fixes (data/constant_predictions.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from ernie_tiny_ds.cli import main
from ernie_tiny_ds.config import load_recipe
from ernie_tiny_ds.data.constant_predictions import KEY, constant_prediction
from ernie_tiny_ds.runtime.export import save_model_folder


def test_one_class_for_every_row_is_flagged_and_a_varied_model_is_not():
    rng = np.random.default_rng()
    labels = rng.integers(0, 3, 200)
    logits = rng.normal(size=(200, 3))
    assert constant_prediction("classification", logits, labels, ["a", "b", "c"]) is None
    logits[:, 2] += 50  # the same class wins on every row, whatever the rest says
    line = constant_prediction("classification", logits, labels, ["a", "b", "c"])
    assert line.startswith("constant predictions: the model predicts class 'c' for all 200 dev rows")
    assert "\n" not in line and "optim.lr" in line
    assert constant_prediction("classification", logits, np.zeros(200, dtype=int)) is None  # one gold class


def test_a_regression_model_stuck_on_the_mean_is_flagged():
    rng = np.random.default_rng()
    labels = rng.uniform(0, 5, 300)
    assert constant_prediction("regression", labels + rng.normal(0, 0.5, 300), labels) is None
    stuck = labels.mean() + rng.normal(0, 1e-3, 300)  # the hard-label MSE plateau: the labels' variance
    assert "constant predictions: the model predicts about" in constant_prediction("regression", stuck, labels)


def _classifier(folder, tokenizer_dir, vocab_size, constant: bool):
    config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=128, num_labels=2)
    model = transformers.BertForSequenceClassification(config).eval()
    model.config.architectures = ["BertForSequenceClassification"]
    if constant:  # what a collapsed student is: its head ignores the text
        with torch.no_grad():
            model.classifier.weight.zero_()
            model.classifier.bias.copy_(torch.tensor([-5.0, 5.0]))
    return save_model_folder(model, tokenizer_dir, folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer_dir, vocab_size):
    root = tmp_path_factory.mktemp("constant")
    return (_classifier(root / "teacher", tokenizer_dir, vocab_size, constant=False),
            _classifier(root / "student", tokenizer_dir, vocab_size, constant=True))


def test_evaluate_names_a_constant_model(models, capsys):
    assert main(["evaluate", "--model", str(models[1]), "--task", "sentiment"]) == 0
    out, err = capsys.readouterr()
    metrics = json.loads(out)
    assert "constant" in metrics[KEY] and "'positive' for all 400 dev rows" in metrics[KEY]
    assert [line for line in err.splitlines() if line.startswith("warning:")] == [f"warning: {metrics[KEY]}"]


def test_the_report_names_a_constant_student(models, tmp_path, capsys):
    from ernie_tiny_ds.workflows.report import build_report

    out = tmp_path / "out"
    out.mkdir()
    recipe = load_recipe(None, ["teacher.config={}", f"teacher.finetuned_path={models[0]}",
                                f"student.path={models[1]}", "task.name=sentiment", "task.max_seq_len=64",
                                f"output_dir={out}", "release.onnx=false"])
    build_report(recipe, out)
    report = json.loads((out / "report.json").read_text())
    assert "constant" in report["student"]["metrics"][KEY]
    assert report["student"]["metrics"]["accuracy"] == pytest.approx(0.5, abs=0.2)  # the score alone hides it
    markdown = (out / "report.md").read_text()
    assert f"**Warning, the student: {report['student']['metrics'][KEY]}**" in markdown
    assert f"warning: the student in {models[1]}: constant predictions" in capsys.readouterr().out

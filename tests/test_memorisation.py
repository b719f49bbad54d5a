"""A student that fits its training rows and not the task is named as such in the report (data/memorisation.py):
the dev score alone reads the same as a student that did not train long enough, whose fix is the opposite."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from test_constant_predictions import _classifier
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from ernie_tiny_ds.assets import task_dir
from ernie_tiny_ds.config import TaskConfig, load_recipe
from ernie_tiny_ds.data.memorisation import GAP, KEY, memorisation


def test_a_student_that_keeps_far_more_on_training_rows_than_on_dev_is_named():
    rng = np.random.default_rng()
    teacher_train, teacher_dev = rng.uniform(0.8, 1.0), rng.uniform(0.5, 0.9)
    share = rng.uniform(0.6, 0.95)
    healthy = memorisation("accuracy", 512, teacher_train, share * teacher_train, teacher_dev,
                           (share - rng.uniform(0, GAP * 0.9)) * teacher_dev)
    assert healthy is None
    on_dev = share - GAP - rng.uniform(0.01, 0.3)
    line = memorisation("accuracy", 512, teacher_train, share * teacher_train, teacher_dev, on_dev * teacher_dev)
    assert line.startswith(f"memorisation: the student keeps {share:.0%} of the teacher's accuracy on 512 training "
                           f"rows") and f"but {on_dev:.0%} on dev" in line
    assert "more steps will not help" in line and "ernie-tiny-ds augment" in line and "\n" not in line
    # a correlation at or below zero, or an undefined score, has no share to compare
    assert memorisation("pearson", 512, -0.1, 0.9, 0.5, 0.1) is None
    assert memorisation("mcc", 512, 0.9, 0.9, None, 0.1) is None


def test_training_rows_are_scored_at_an_even_stride_like_a_plain_forward(tmp_path, tokenizer_dir, vocab_size):
    from ernie_tiny_ds.data.tasks import load_task
    from ernie_tiny_ds.workflows.evaluate import load_classifier, training_rows_score

    model_dir = _classifier(tmp_path / "model", tokenizer_dir, vocab_size, constant=False)
    task = load_task(TaskConfig(name="sentiment", max_seq_len=64))
    score, rows = training_rows_score(*load_classifier(model_dir, task), task, 100)
    # the reference: the train file read here, every 20th of its 2,000 rows, one row per forward, no padding
    with open(task_dir("sentiment") / "train.tsv", newline="") as f:
        table = list(csv.DictReader(f, delimiter="\t"))
    chosen = table[::len(table) // 100][:100]
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval().double()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    right = 0
    with torch.no_grad():
        for row in chosen:
            logits = model(**tokenizer(row["sentence"], truncation=True, max_length=64, return_tensors="pt")).logits
            right += ["negative", "positive"][int(logits.argmax())] == row["label"]
    assert rows == len(chosen) == 100
    assert score == pytest.approx(right / rows)


def test_the_report_names_a_student_that_memorised_and_shows_both_scores(tmp_path, tokenizer_dir, vocab_size,
                                                                         monkeypatch, capsys):
    from ernie_tiny_ds.workflows import evaluate
    from ernie_tiny_ds.workflows.report import build_report

    teacher = _classifier(tmp_path / "teacher", tokenizer_dir, vocab_size, constant=False)
    student = _classifier(tmp_path / "student", tokenizer_dir, vocab_size, constant=False)
    out = tmp_path / "out"
    out.mkdir()
    recipe = load_recipe(None, ["teacher.config={}", f"teacher.finetuned_path={teacher}", f"student.path={student}",
                                "task.name=sentiment", "task.max_seq_len=64", f"output_dir={out}",
                                "release.onnx=false"])
    # the two tiny models score alike everywhere: give the student the training-row score of one that memorised
    real_load, real_score, loaded = evaluate.load_classifier, evaluate.training_rows_score, {}

    def load_once(folder, task):  # dev and training rows are scored on one load of each model
        assert str(folder) not in loaded, f"{folder} loaded twice"
        loaded[str(folder)] = real_load(folder, task)
        return loaded[str(folder)]

    monkeypatch.setattr(evaluate, "load_classifier", load_once)
    monkeypatch.setattr(evaluate, "training_rows_score", lambda model, tokenizer, task, rows: (
        (0.99, rows) if model is loaded[str(student)][0] else real_score(model, tokenizer, task, rows)))
    build_report(recipe, out)
    assert sorted(loaded) == sorted([str(teacher), str(student)])
    report = json.loads((out / "report.json").read_text())
    fit = report["training_rows"]
    assert fit["rows"] == 512 and fit["student"] == 0.99 and 0 <= fit["teacher"] <= 1
    assert fit[KEY].startswith("memorisation: the student keeps")
    markdown = (out / "report.md").read_text()
    assert f"On 512 training rows (accuracy): teacher {fit['teacher']:.4g}, student 0.99." in markdown
    assert f"**Warning, the student: {fit[KEY]}**" in markdown
    assert f"warning: {fit[KEY]}" in capsys.readouterr().out

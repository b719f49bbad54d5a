"""Best-checkpoint selection in the task-specific stage: the held-out selection split, the sharded
evaluation every train.eval_every steps on 2 ranks (ZeRO-3), student_best/ and which student ships."""
import json
import re

import pytest
import torch
import transformers
from distributed import run_ranks, tiny_recipe, tiny_teacher

from ernie_tiny_ds.config import TaskConfig, load_recipe
from ernie_tiny_ds.data.benchmarks import compute_metrics
from ernie_tiny_ds.data.tasks import iter_dev_batches, load_task
from ernie_tiny_ds.errors import ConfigError
from ernie_tiny_ds.runtime.selection import BEST_DIR, ship_choice, shipped_student
from ernie_tiny_ds.workflows.evaluate import predict


def test_selection_split_holds_out_the_same_examples_every_time():
    full = load_task(TaskConfig(name="sentiment"))
    task = load_task(TaskConfig(name="sentiment", selection_split=0.1))
    again = load_task(TaskConfig(name="sentiment", selection_split=0.1))
    assert (len(task.selection) == round(0.1 * len(full.train))
            and len(task.train) + len(task.selection) == len(full.train))
    assert [e.source for e in task.selection] == [e.source for e in again.selection]
    assert not {e.source for e in task.selection} & {e.source for e in task.train}
    assert [e.source for e in task.dev] == [e.source for e in full.dev]  # dev untouched: its score stays honest
    with pytest.raises(ConfigError, match=r"task.selection_split must be a fraction in \(0, 1\), got 1.5"):
        load_recipe(None, ["teacher.config={}", "task.selection_split=1.5"])
    with pytest.raises(ConfigError, match="train.eval_every must be > 0"):
        load_recipe(None, ["teacher.config={}", "train.eval_every=0"])


def test_the_best_ships_by_default_when_stage_4_evaluates(tmp_path):
    stage = tmp_path / "task_specific"
    (stage / BEST_DIR).mkdir(parents=True)
    (stage / BEST_DIR / "config.json").write_text("{}")
    plain = load_recipe(None, ["teacher.config={}"])
    evaluating = load_recipe(None, ["teacher.config={}", "stages.task_specific.train.eval_every=5"])
    last = load_recipe(None, ["teacher.config={}", "train.eval_every=5", "task.ship=last"])
    assert (ship_choice(plain), ship_choice(evaluating), ship_choice(last)) == ("last", "best", "last")
    assert shipped_student(evaluating, tmp_path) == stage / BEST_DIR
    assert shipped_student(last, tmp_path) == stage / "student"
    assert shipped_student(plain, tmp_path) == stage / "student"


def finetuned_teacher(folder, tokenizer_dir, vocab_size):
    torch.manual_seed(1)
    values = {k: v for k, v in tiny_teacher(vocab_size).items() if k != "model_type"}
    config = transformers.BertConfig(**values, num_labels=2, id2label={0: "negative", 1: "positive"},
                                     label2id={"negative": 0, "positive": 1})
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
def test_stage_4_scores_on_every_rank_and_exports_the_best(tmp_path, tokenizer_dir, vocab_size):
    selection = 0.0105  # 21 held-out examples: the two ranks' shares differ in size
    recipe = tiny_recipe(tmp_path, tokenizer_dir, vocab_size,
                         teacher={"finetuned_path": finetuned_teacher(tmp_path / "ft", tokenizer_dir, vocab_size)},
                         task={"name": "sentiment", "max_seq_len": 32, "selection_split": selection},
                         train={"max_steps": 6, "save_every": 6, "eval_every": 2},
                         optim={"lr": 3e-3}, deepspeed={"config": "zero3"})
    proc = run_ranks(["distill", "--config", str(recipe), "--stage", "task_specific"], ranks=2, timeout=600)
    evals = [(int(step), float(score)) for step, score in
             re.findall(r"eval step (\d+): selection accuracy ([0-9.]+)", proc.stdout)]
    assert [step for step, _ in evals] == [2, 4, 6], proc.stdout[-3000:]

    stage = tmp_path / "out" / "task_specific"
    best = json.loads((stage / BEST_DIR / "best.json").read_text())
    top = max(score for _, score in evals)
    assert best["step"] == next(step for step, score in evals if score == top)  # the first of equal scores
    assert best["metric"] == "accuracy" and best["split"] == "selection"
    # the exported best, scored here on the whole selection set in one process, has the gathered score
    task = load_task(TaskConfig(name="sentiment", max_seq_len=32, selection_split=selection))
    model = transformers.AutoModelForSequenceClassification.from_pretrained(stage / BEST_DIR)
    tokenizer = transformers.AutoTokenizer.from_pretrained(stage / BEST_DIR)
    logits, labels = predict(model, iter_dev_batches(task, tokenizer, 8, task.selection))
    assert compute_metrics("classification", logits, labels)["accuracy"] == pytest.approx(best["score"], abs=1e-12)
    assert (stage / "student" / "config.json").is_file()  # the last one is exported beside it


def test_the_report_shows_best_and_last_and_which_ships(tmp_path, monkeypatch):
    from ernie_tiny_ds.workflows import evaluate
    from ernie_tiny_ds.workflows.report import selection_lines, selection_section

    stage = tmp_path / "task_specific"
    for name in (BEST_DIR, "student"):
        (stage / name).mkdir(parents=True)
    (stage / BEST_DIR / "best.json").write_text(json.dumps({"step": 40, "score": 0.9, "metric": "accuracy",
                                                            "split": "selection"}))
    monkeypatch.setattr(evaluate, "evaluate_model", lambda folder, cfg, *a, **k: {"accuracy": 0.7})
    recipe = load_recipe(None, ["teacher.config={}", "train.eval_every=20"])
    section = selection_section(recipe, tmp_path, stage / BEST_DIR, {"accuracy": 0.8})
    assert section["ships"] == "best" and section["best_step"] == 40 and section["selection_score"] == 0.9
    assert section["best"]["metrics"] == {"accuracy": 0.8} and section["last"]["metrics"] == {"accuracy": 0.7}
    text = "\n".join(selection_lines(section, "accuracy"))
    assert "| best (step 40) | 0.8 |" in text and "| last | 0.7 |" in text and "**best** ships" in text
    assert selection_section(recipe, tmp_path / "elsewhere", stage / "student", {}) is None

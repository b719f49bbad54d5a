"""Best-teacher selection in teacher finetuning: finetune.eval_every (default train.eval_every), the
best teacher exported beside the last with best.json, task.selection_split honoured, finetune.ship,
a resume that keeps the best score, the later stages distilling from the chosen teacher, and the
report's best-vs-last table."""
import json
import re

import pytest
import torch
import transformers
import yaml
from distributed import run_cli, run_ranks, tiny_recipe, tiny_teacher
from test_finetune import keyword_task

from ernie_tiny_ds.config import load_recipe
from ernie_tiny_ds.data.benchmarks import compute_metrics
from ernie_tiny_ds.data.tasks import iter_dev_batches, load_task
from ernie_tiny_ds.errors import ConfigError
from ernie_tiny_ds.runtime.selection import BEST_FILE, EvalPlan, Ranks, Selector, read_best
from ernie_tiny_ds.workflows.evaluate import predict
from ernie_tiny_ds.workflows.finetune import (
    DONE_FILE,
    best_dir,
    engine_settings,
    eval_every,
    last_and_best,
    ship_choice,
    shipped_teacher,
)

EVAL_LINE = r"eval step (\d+): {} accuracy ([0-9.]+)"


def evals(stdout: str, split: str) -> list[tuple[int, float]]:
    return [(int(step), float(score)) for step, score in re.findall(EVAL_LINE.format(split), stdout)]


def first_best(scores: list[tuple[int, float]]) -> tuple[int, float]:
    top = max(score for _, score in scores)
    return next((step, score) for step, score in scores if score == top)  # the first of equal scores


def fake_teacher(folder, best: dict | None = None):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    if best is not None:
        (folder / BEST_FILE).write_text(json.dumps(best))
    return folder


def test_finetune_eval_every_defaults_to_train_eval_every_and_picks_what_ships(tmp_path):
    base = ["teacher.config={}"]
    plain = load_recipe(None, base)
    inherited = load_recipe(None, base + ["train.eval_every=5"])
    own = load_recipe(None, base + ["train.eval_every=5", "finetune.eval_every=3"])
    stage4_only = load_recipe(None, base + ["stages.task_specific.train.eval_every=5"])
    last = load_recipe(None, base + ["finetune.eval_every=3", "finetune.ship=last"])
    assert [eval_every(r) for r in (plain, inherited, own, stage4_only)] == [None, 5, 3, None]
    settings = engine_settings(load_recipe(None, base + ["finetune.lr=3e-4", "finetune.micro_batch_size=6",
                                                         "train.grad_accum=4", "optim.lr=1e-2"]), 10)
    assert (settings.lr, settings.micro_batch_size, settings.grad_accum, settings.total_steps) == (3e-4, 6, 1, 10)
    assert [ship_choice(r) for r in (plain, inherited, own, last)] == ["last", "best", "best", "last"]
    with pytest.raises(ConfigError, match="finetune.eval_every must be > 0, got 0"):
        engine_settings(load_recipe(None, base + ["finetune.eval_every=0"]), 10)

    output = fake_teacher(tmp_path / "teacher_finetuned")
    assert shipped_teacher(own, output) == output  # nothing exported yet: the last
    best = fake_teacher(best_dir(output), {"step": 2, "score": 0.5, "metric": "accuracy", "split": "dev"})
    assert best == tmp_path / "teacher_finetuned_best"
    assert shipped_teacher(own, output) == best and shipped_teacher(last, output) == output
    assert last_and_best(best) == last_and_best(output) == (output, best)


def test_the_pipeline_hands_the_chosen_teacher_to_stages_2_to_4(tmp_path, monkeypatch):
    from ernie_tiny_ds.workflows import pipeline

    out = tmp_path / "out"
    output = fake_teacher(out / "teacher_finetuned")
    fake_teacher(best_dir(output), {"step": 2, "score": 0.5, "metric": "accuracy", "split": "dev"})
    monkeypatch.setattr(pipeline, "finetune_teacher", lambda recipe, path: path)
    for ship, expected in (("best", best_dir(output)), ("last", output)):
        recipe = load_recipe(None, ["teacher.config={}", "finetune.eval_every=2", f"finetune.ship={ship}"])
        assert pipeline.ensure_finetuned_teacher(recipe, out, ["general_enhanced"], True) == (str(expected), False)
    monkeypatch.setattr(pipeline, "finetune_teacher", lambda recipe, path: None)  # a stop request
    assert pipeline.ensure_finetuned_teacher(recipe, out, ["general_enhanced"], True) == (None, True)


def tiny_classifier(vocab_size):
    values = {k: v for k, v in tiny_teacher(vocab_size, layers=1, hidden=32).items() if k != "model_type"}
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(transformers.BertConfig(**values, num_labels=2))


def test_a_resumed_selector_keeps_the_best_score_and_a_fresh_one_forgets_it(tmp_path, tokenizer_dir, vocab_size):
    from ernie_tiny_ds.config import TaskConfig

    task = load_task(TaskConfig(**{**keyword_task(tmp_path / "task", n_train=64, n_dev=20), "selection_split": 0.25}))
    model, tokenizer = tiny_classifier(vocab_size), transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    folder = fake_teacher(tmp_path / "t_best", {"step": 4, "score": 2.0, "metric": "accuracy", "split": "selection"})
    args = (model, tokenizer, folder, EvalPlan(task, every=3, last_step=8), Ranks(0, 1, torch.device("cpu"), zero=1))
    resumed = Selector(*args, resumed=True)
    assert resumed.best_score == 2.0 and resumed.split == "selection" and len(resumed.examples) == 16
    resumed(6)  # no score beats the one before the interruption: nothing exported
    assert read_best(folder)["step"] == 4 and resumed.best_score == 2.0
    resumed(7)  # not an evaluation step (every 3, and the last, 8)
    fresh = Selector(*args, resumed=False)
    assert fresh.best_score is None and not folder.exists()  # an earlier run's best never ships
    fresh(8)
    best = read_best(folder)
    assert best["step"] == 8 and best["split"] == "selection" and best["score"] == fresh.best_score
    assert transformers.AutoModelForSequenceClassification.from_pretrained(folder).num_labels == 2


def test_the_report_shows_the_teachers_best_and_last_and_which_was_used(tmp_path, monkeypatch):
    from ernie_tiny_ds.workflows import evaluate
    from ernie_tiny_ds.workflows.report import selection_lines, teacher_selection_section

    output = fake_teacher(tmp_path / "teacher_finetuned")
    best = fake_teacher(best_dir(output), {"step": 6, "score": 0.9, "metric": "accuracy", "split": "selection"})
    monkeypatch.setattr(evaluate, "evaluate_model", lambda folder, cfg, *a, **k: {"accuracy": 0.7})
    recipe = load_recipe(None, ["teacher.config={}", "finetune.eval_every=3"])
    section = teacher_selection_section(recipe, best, {"accuracy": 0.8})
    assert section["ships"] == "best" and section["choice"] == "best" and section["best_step"] == 6
    assert section["best"]["metrics"] == {"accuracy": 0.8} and section["last"]["metrics"] == {"accuracy": 0.7}
    text = "\n".join(selection_lines(section, "accuracy", "teacher (finetuning)",
                                     "stages 2-4 distilled from the **{}** one."))
    assert "## Best and last teacher (finetuning)" in text and "| best (step 6) | 0.8 |" in text
    assert "| last | 0.7 |" in text and "distilled from the **best** one" in text
    assert teacher_selection_section(recipe, output, {"accuracy": 0.7})["ships"] == "last"
    assert teacher_selection_section(recipe, tmp_path / "elsewhere", {}) is None


def finetune_recipe_file(tmp_path, tokenizer_dir, vocab_size, **finetune):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "out"),
        "teacher": {"config": tiny_teacher(vocab_size, layers=2)},
        "data": {"tokenizer": tokenizer_dir},
        "task": keyword_task(tmp_path / "task", n_train=128, n_dev=32),
        "finetune": {"epochs": 1, "lr": 3e-3, "micro_batch_size": 16, "warmup_ratio": 0.1, "seed": 1, **finetune},
        "train": {"dist_timeout_s": 120},
    }))
    return path


@pytest.mark.slow
def test_one_process_on_dev_ship_last_and_a_resume_that_keeps_the_best(tmp_path, tokenizer_dir, vocab_size):
    """No selection split: scored on dev. A STOP after step 1 (eval_every=1) leaves a best at step 1;
    its score raised to an unbeatable 2.0 must survive the resume. finetune.ship=last keeps the last."""
    path = finetune_recipe_file(tmp_path, tokenizer_dir, vocab_size, eval_every=1, ship="last")
    out = tmp_path / "out" / "teacher_finetuned"
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "STOP").touch()
    first = run_cli(["finetune-teacher", "--config", str(path)])
    assert first.returncode == 0 and "stopped at step 1 of 8" in first.stdout, first.stdout[-3000:]
    assert evals(first.stdout, "dev")[0][0] == 1
    best = read_best(best_dir(out))
    assert (best["step"], best["split"], best["metric"]) == (1, "dev", "accuracy")
    (best_dir(out) / BEST_FILE).write_text(json.dumps({**best, "score": 2.0}))

    second = run_cli(["finetune-teacher", "--config", str(path)])
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert [step for step, _ in evals(second.stdout, "dev")] == list(range(2, 9))
    assert "best so far" not in second.stdout and read_best(best_dir(out))["score"] == 2.0
    done = json.loads((out / DONE_FILE).read_text())
    assert done["ship"] == "last" and done["best"]["step"] == 1
    assert shipped_teacher(load_recipe(path), out) == out


@pytest.mark.slow
def test_two_ranks_select_the_best_teacher_that_stage_2_distils_from(tmp_path, tokenizer_dir, vocab_size):
    selection = 0.09  # 23 held-out examples: the two ranks' shares differ in size
    task = {**keyword_task(tmp_path / "task", n_train=256, n_dev=32), "selection_split": selection}
    recipe = tiny_recipe(tmp_path, tokenizer_dir, vocab_size, task=task,
                         teacher={"config": tiny_teacher(vocab_size, 2)},  # 2 layers: learns in 14 steps
                         finetune={"epochs": 2, "lr": 3e-3, "micro_batch_size": 16, "seed": 1, "eval_every": 3},
                         train={"max_steps": 2, "save_every": 2}, deepspeed={"config": "zero3"})
    proc = run_ranks(["pipeline", "--config", str(recipe), "--to-stage", "general_enhanced"], ranks=2, timeout=900)
    scores = evals(proc.stdout, "selection")
    assert [step for step, _ in scores] == [3, 6, 9, 12, 14], proc.stdout[-3000:]  # every 3 and the last

    out = tmp_path / "out"
    last, best = out / "teacher_finetuned", out / "teacher_finetuned_best"
    info = read_best(best)
    assert info["step"] == first_best(scores)[0] and info["score"] == pytest.approx(first_best(scores)[1], abs=5e-5)
    assert info["metric"] == "accuracy" and info["split"] == "selection"
    # the exported best, scored here on the whole selection set in one process, has the gathered score
    cfg = load_recipe(recipe).task
    held_out = load_task(cfg)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(best)
    tokenizer = transformers.AutoTokenizer.from_pretrained(best)
    logits, labels = predict(model, iter_dev_batches(held_out, tokenizer, 8, held_out.selection))
    assert compute_metrics("classification", logits, labels)["accuracy"] == pytest.approx(info["score"], abs=1e-12)
    assert len(held_out.selection) == 23 and len(held_out.train) == 233
    done = json.loads((last / DONE_FILE).read_text())
    assert done["best"] == info and done["ship"] == "best"
    # stage 2 distilled from the best teacher; stage 1 from the pretrained one
    stage2 = json.loads((out / "general_enhanced" / "stage_done.json").read_text())
    assert stage2["teacher"] == str(best) and stage2["teacher_finetuned"] is True
    assert json.loads((out / "general" / "stage_done.json").read_text())["teacher"] == "inline config"

"""Several students from one teacher pass (recipe key `students:`, runtime/shared_teacher.py): each
student trained together with another equals its solo run (per-step losses, final weights), a
resume after a stop (even one between two students' saves) equals the uninterrupted run, and on 2
ranks each student's folder is a normal stage folder that exports and loads."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from distributed import read_metrics, run_ranks, tiny_recipe
from safetensors.torch import load_file

STUDENTS = [{"name": "small", "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
             "intermediate_size": 64},
            {"name": "wide", "num_hidden_layers": 3, "hidden_size": 48, "num_attention_heads": 4}]


def recipes(tmp_path: Path, tokenizer_dir: str, vocab_size: int, seed: int, **train) -> tuple[Path, dict]:
    """The joint recipe (dropout on, so each student's RNG stream matters) and each student's solo recipe."""
    joint = tiny_recipe(tmp_path, tokenizer_dir, vocab_size, train={"seed": seed, "save_every": 2, **train},
                        student={"intermediate_size": 80})
    values = yaml.safe_load(joint.read_text())
    values["teacher"]["config"]["hidden_dropout_prob"] = 0.1  # the students inherit it (the teacher runs in eval)
    values["teacher"]["config"]["attention_probs_dropout_prob"] = 0.1
    solos = {}
    for shape in STUDENTS:
        solo = {**values, "output_dir": str(tmp_path / f"solo_{shape['name']}"),
                "student": {**values["student"], **{k: v for k, v in shape.items() if k != "name"}}}
        solos[shape["name"]] = tmp_path / f"solo_{shape['name']}.yaml"
        solos[shape["name"]].write_text(yaml.safe_dump(solo))
    values["students"] = STUDENTS
    joint.write_text(yaml.safe_dump(values))
    return joint, solos


def losses(stage_dir: Path) -> dict[int, float]:
    """step -> loss (a resumed run writes the steps after its checkpoint again: the later row counts)."""
    return {row["step"]: row["loss"] for row in read_metrics(stage_dir / "metrics.jsonl")}


def assert_same_losses(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want) == list(range(1, len(want) + 1))
    assert [got[s] for s in sorted(got)] == pytest.approx([want[s] for s in sorted(want)], rel=1e-6, abs=1e-7)


def weights(stage_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_file(str(stage_dir / "student" / "model.safetensors")).items()}


def assert_same_student(got: Path, want: Path) -> None:
    assert_same_losses(losses(got), losses(want))
    a, b = weights(got), weights(want)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7, msg=key)


def distill(in_process, recipe: Path, *overrides: str) -> None:
    code, err = in_process(["distill", "--config", str(recipe), "--stage", "general", *overrides])
    assert code == 0, err


@pytest.mark.slow
def test_students_trained_together_equal_their_solo_runs(tmp_path, tokenizer_dir, vocab_size, in_process):
    joint, solos = recipes(tmp_path, tokenizer_dir, vocab_size, seed=random.randrange(1 << 30))
    for solo in solos.values():
        distill(in_process, solo)
    distill(in_process, joint)
    out = tmp_path / "out"
    for name in solos:
        assert_same_student(out / name / "general", tmp_path / f"solo_{name}" / "general")
        done = json.loads((out / name / "general" / "stage_done.json").read_text())
        assert done["steps"] == 6 and done["export_max_abs_diff"] < 1e-4
    # the students differ from each other: the comparison above is not of two copies of one model
    assert losses(out / "small" / "general") != losses(out / "wide" / "general")


@pytest.mark.slow
def test_a_resume_after_a_stop_between_two_students_saves_equals_the_uninterrupted_run(
        tmp_path, tokenizer_dir, vocab_size, in_process):
    seed = random.randrange(1 << 30)
    whole, _ = recipes(tmp_path / "whole", tokenizer_dir, vocab_size, seed)
    distill(in_process, whole)
    stopped, _ = recipes(tmp_path / "stopped", tokenizer_dir, vocab_size, seed)
    distill(in_process, stopped, "train.stop_at_step=4")  # saves at 2 and 4
    out = tmp_path / "stopped" / "out"
    assert not (out / "small" / "general" / "stage_done.json").exists()
    # a crash between the two students' saves of step 4: `wide` never wrote it
    shutil.rmtree(out / "wide" / "general" / "checkpoints" / "step_00000004")
    (out / "wide" / "general" / "checkpoints" / "latest").write_text("step_00000002")
    distill(in_process, stopped)
    assert json.loads((out / "small" / "general" / "stage_done.json").read_text())["steps"] == 6
    for name in ("small", "wide"):
        assert_same_student(out / name / "general", tmp_path / "whole" / "out" / name / "general")


@pytest.mark.slow
def test_a_non_finite_loss_skips_only_that_students_step(tmp_path, tokenizer_dir, vocab_size, in_process,
                                                         monkeypatch):
    from ernie_tiny_ds.distill.objective import DistillationObjective

    seed = random.randrange(1 << 30)
    clean, _ = recipes(tmp_path / "clean", tokenizer_dir, vocab_size, seed)
    distill(in_process, clean)
    calls, forward = [], DistillationObjective.forward

    def nan_at_wides_third_step(self, *args, **kwargs):
        total, terms = forward(self, *args, **kwargs)
        if self.student.config.hidden_size == 48:
            calls.append(1)
            if len(calls) == 3:
                return total * float("nan"), terms
        return total, terms
    monkeypatch.setattr(DistillationObjective, "forward", nan_at_wides_third_step)
    poisoned, _ = recipes(tmp_path / "poisoned", tokenizer_dir, vocab_size, seed)
    distill(in_process, poisoned)
    out, want = tmp_path / "poisoned" / "out", tmp_path / "clean" / "out"
    assert_same_student(out / "small" / "general", want / "small" / "general")  # untouched by the other's NaN
    wide = losses(out / "wide" / "general")
    assert sorted(wide) == [1, 2, 4, 5, 6]  # its step 3 skipped, the rest trained on
    assert [wide[s] for s in (1, 2)] == pytest.approx([losses(want / "wide" / "general")[s] for s in (1, 2)])
    assert wide[4] != pytest.approx(losses(want / "wide" / "general")[4])


@pytest.mark.parametrize("bad, line", [
    ([{"name": "a"}, {"name": "a"}], "students[1].name: 'a' names two students"),
    ([{"hidden_size": 64}], "students[0].name: give each student a name"),
    ([{"name": "general"}], "students[0].name: 'general' cannot name a folder"),
    ([{"name": "x", "hidden_size": 30, "num_attention_heads": 4}], "students[0].hidden_size (30) must be divisible"),
    ([{"name": "x", "hiden_size": 30}], "unknown key 'students[0].hiden_size'"),
    ([{"name": "x", "num_hidden_layers": 0}], "students[0].num_hidden_layers must be > 0"),
    ([{"name": "x", "path": "/m"}], "unknown key 'students[0].path'"),
])
def test_a_bad_students_entry_is_one_line_naming_its_key(tmp_path, tokenizer_dir, vocab_size, in_process, bad, line):
    recipe = tiny_recipe(tmp_path, tokenizer_dir, vocab_size)
    values = yaml.safe_load(recipe.read_text())
    values["students"] = bad
    recipe.write_text(yaml.safe_dump(values))
    code, err = in_process(["distill", "--config", str(recipe), "--stage", "general"])
    assert code == 2 and len(err) == 1 and line in err[0], err


@pytest.mark.slow
def test_two_ranks_train_two_students_whose_folders_export_and_load(tmp_path, tokenizer_dir, vocab_size):
    from transformers import AutoModel
    recipe, _ = recipes(tmp_path, tokenizer_dir, vocab_size, seed=random.randrange(1 << 30), max_steps=4)
    run_ranks(["distill", "--config", str(recipe), "--stage", "general"])
    out = tmp_path / "out"
    for shape in STUDENTS:
        stage = out / shape["name"] / "general"
        done = json.loads((stage / "stage_done.json").read_text())
        assert done["steps"] == 4 and done["export_max_abs_diff"] < 1e-4
        assert {p.name for p in (stage / "checkpoints" / "step_00000004").glob("trainer_state_rank*.pt")} == \
            {"trainer_state_rank0.pt", "trainer_state_rank1.pt"}
        model = AutoModel.from_pretrained(stage / "student")
        assert model.config.num_hidden_layers == shape["num_hidden_layers"]
        assert model.config.hidden_size == shape["hidden_size"]
        assert len(losses(stage)) == 4


@pytest.mark.slow
def test_the_pipeline_trains_the_general_stages_together_then_each_student_alone_with_a_row_each(
        tmp_path, tokenizer_dir, vocab_size, in_process):
    recipe, _ = recipes(tmp_path, tokenizer_dir, vocab_size, seed=random.randrange(1 << 30), max_steps=2)
    values = yaml.safe_load(recipe.read_text())
    values.update(task={"name": "sentiment", "max_seq_len": 32}, release={"onnx": False},
                  finetune={"epochs": 0.1, "lr": 1e-3, "micro_batch_size": 16})
    recipe.write_text(yaml.safe_dump(values))
    code, err = in_process(["pipeline", "--config", str(recipe)])
    assert code == 0, err
    out = tmp_path / "out"
    assert not (out / "general").exists() and (out / "teacher_finetuned").is_dir()  # one teacher for all
    for shape in STUDENTS:
        folder = out / shape["name"]
        done = {stage: json.loads((folder / stage / "stage_done.json").read_text())
                for stage in ("general", "general_enhanced", "task_adaptive", "task_specific")}
        # each stage starts from this student's previous stage, never the other student's
        assert done["general_enhanced"]["student_init"] == str(folder / "general" / "student")
        assert done["task_adaptive"]["student_init"] == str(folder / "general_enhanced" / "student")
        assert done["task_specific"]["student_init"] == str(folder / "task_adaptive" / "student")
        assert (folder / "report.md").is_file()
    rows = json.loads((out / "report.json").read_text())["students"]
    assert [(row["name"], row["shape"]) for row in rows] == [("small", "2L-32"), ("wide", "3L-48")]
    assert all(0 <= row["score"] <= 1 and row["params"] > 0 for row in rows)
    table = (out / "report.md").read_text()
    assert "| [small](small/report.md) | 2L-32 |" in table and "| [wide](wide/report.md) | 3L-48 |" in table
    done = json.loads((out / "pipeline_done.json").read_text())  # written last, naming every student's folder
    assert done["students"] == {shape["name"]: json.loads((out / shape["name"] / "pipeline_done.json").read_text())
                                ["student"] for shape in STUDENTS}
    assert all(Path(path).is_relative_to(out / name) for name, path in done["students"].items())
    # a re-run finds every stage done
    code, err = in_process(["pipeline", "--config", str(recipe)])
    assert code == 0, err

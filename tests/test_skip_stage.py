"""`pipeline --skip-stage`: which steps run, and the one-line refusals (no process group needed)."""
import pytest
from distributed import tiny_recipe

from ernie_tiny_ds.errors import ConfigError
from ernie_tiny_ds.workflows.pipeline import steps_to_run


def names(first, last, skip):
    steps, skipped = steps_to_run(first, last, skip)
    return [name for name, _ in steps], list(skipped)


def test_skipped_stages_leave_the_range_and_the_rest_keep_their_order():
    assert names(0, 4, [2, 3]) == (["finetune", "general", "task_specific"], ["general_enhanced", "task_adaptive"])
    assert names(2, 4, [3, 3]) == (["general_enhanced", "task_specific"], ["task_adaptive"])
    assert names(1, 4, []) == (["general", "general_enhanced", "task_adaptive", "task_specific"], [])


@pytest.mark.parametrize("first, last, skip, message", [
    (0, 4, [0], "--skip-stage finetune: teacher finetuning runs only when a stage needs it"),
    (2, 4, [1], "--skip-stage general: not in the range --from-stage general_enhanced --to-stage task_specific"),
    (3, 4, [3, 4], "every distillation stage in the range is skipped"),
])
def test_a_skip_that_cannot_be_done_is_refused(first, last, skip, message):
    with pytest.raises(ConfigError, match=message):
        steps_to_run(first, last, skip)


def test_the_cli_refuses_a_bad_skip_in_one_line_before_any_work(tmp_path, tokenizer_dir, vocab_size, in_process):
    recipe = tiny_recipe(tmp_path, tokenizer_dir, vocab_size)
    code, err = in_process(["pipeline", "--config", str(recipe), "--from-stage", "2", "--skip-stage", "general"])
    assert code == 2 and len(err) == 1, err
    assert "--skip-stage general: not in the range" in err[0]
    code, err = in_process(["pipeline", "--config", str(recipe), "--skip-stage", "7"])
    assert code == 2 and "unknown stage '7'" in "\n".join(err), err
    assert not (tmp_path / "out" / "general").exists()


def test_the_report_leaves_out_a_skipped_stage_whose_old_folder_is_there(tmp_path):
    import json
    import random

    from ernie_tiny_ds.runtime.loop import DONE_FILE
    from ernie_tiny_ds.workflows.report import stage_section

    losses = {}
    for name in ("general", "general_enhanced", "task_specific"):  # general_enhanced: left by an earlier run
        (tmp_path / name).mkdir()
        losses[name] = random.uniform(0.1, 5.0)
        (tmp_path / name / DONE_FILE).write_text(json.dumps({"steps": 3, "final_loss": losses[name]}))
    listed = stage_section(tmp_path, skipped=("general_enhanced",))
    assert [(s["name"], s["final_loss"]) for s in listed] == [("general", losses["general"]),
                                                               ("task_specific", losses["task_specific"])]
    assert [s["name"] for s in stage_section(tmp_path)] == ["general", "general_enhanced", "task_specific"]


def test_a_range_that_reads_the_task_refuses_a_missing_task_before_the_general_stages(
        tmp_path, tokenizer_dir, vocab_size, in_process):
    finetuned = tmp_path / "finetuned"
    finetuned.mkdir()
    recipe = tiny_recipe(tmp_path, tokenizer_dir, vocab_size, teacher={"finetuned_path": str(finetuned)})
    code, err = in_process(["pipeline", "--config", str(recipe), "--from-stage", "1", "--to-stage", "3"])
    assert code == 2 and len(err) == 1, err
    assert "task.train_file: not set, and task.name None is not a bundled task" in err[0]
    assert not (tmp_path / "out" / "general").exists()  # refused before stage 1's hours, not after
    for stage in ("task_adaptive", "task_specific"):  # and one task stage alone, before any model loads
        code, err = in_process(["distill", "--config", str(recipe), "--stage", stage])
        assert code == 2 and len(err) == 1, err
        assert "task.train_file: not set, and task.name None is not a bundled task" in err[0]
        assert not (tmp_path / "out" / stage).exists()

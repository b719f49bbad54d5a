"""A changed recipe is never silently ignored: resume applies the keys that are safe to change (a
new optim.lr really takes effect) and refuses the others naming each one; the pipeline skips a
finished stage only when its recipe is unchanged, and rebuilds a finished stage's export that no
longer loads."""
import json
import re
import shutil

import pytest
import yaml
from distributed import read_metrics, run_cli, tiny_recipe

from ernie_tiny_ds.config import load_recipe
from ernie_tiny_ds.errors import ConfigError
from ernie_tiny_ds.runtime import recipe_changes


def fingerprints(path, *overrides, stage="general"):
    return recipe_changes.fingerprint(load_recipe(path, list(overrides)), stage)


def test_fingerprint_names_every_changed_key_and_refuses_unsafe_ones(tmp_path, tokenizer_dir, vocab_size):
    recipe = tiny_recipe(tmp_path, tokenizer_dir, vocab_size)
    old = fingerprints(recipe)
    assert old == fingerprints(recipe, "output_dir=/elsewhere")  # a run folder may move
    safe = recipe_changes.check(old, fingerprints(recipe, "optim.lr=0.002", "train.max_steps=9"),
                                recipe_changes.SAFE_ON_RESUME, "what", "remedy")
    assert [k for k, _, _ in safe] == ["optim.lr", "train.max_steps"]
    with pytest.raises(ConfigError, match=r"what: losses.weights.hidden \(1.0 -> 0.5\), "
                                          r"train.micro_batch_size \(4 -> 8\); only .*; remedy"):
        recipe_changes.check(old, fingerprints(recipe, "losses.weights.hidden=0.5", "train.micro_batch_size=8",
                                               "optim.lr=0.002"), recipe_changes.SAFE_ON_RESUME, "what", "remedy")
    with pytest.raises(ConfigError, match=r"optim.lr \(0.001 -> 0.002\)"):  # a finished stage was trained with it
        recipe_changes.check(old, fingerprints(recipe, "optim.lr=0.002"), recipe_changes.SAFE_ON_SKIP, "w", "r")
    # a stage override counts as a change of that stage only
    assert fingerprints(recipe, "stages.task_adaptive.optim.lr=0.5") == old


def distill(recipe, *overrides):
    return run_cli(["distill", "--config", str(recipe), "--stage", "general", *overrides])


@pytest.mark.slow
def test_resume_applies_a_new_lr_and_refuses_an_unsafe_change(tmp_path, stopped_run, in_process):
    recipe = stopped_run  # stage 1 of 6 steps stopped at step 2, a checkpoint every 2
    ckpt = tmp_path / "out/general/checkpoints/step_00000002"
    assert json.loads((ckpt / "recipe.json").read_text())["optim"]["lr"] == 0.001

    # a refusal needs no launcher: in this process (an uncaught exception, a traceback, fails the test)
    code, err = in_process(["distill", "--config", str(recipe), "--stage", "general", "losses.weights.hidden=0.5"])
    assert code == 2
    lines = [line for line in err if "error:" in line]
    assert len(lines) == 1 and not any("Traceback" in line for line in err), err
    assert re.search(r"error: the recipe of general changed since .*step_00000002 was written: "
                     r"losses.weights.hidden \(1.0 -> 0.5\); only .*optim.lr.*; rm -r .*out/general", lines[0])

    resumed = distill(recipe, "optim.lr=0.002")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(r"warning: general: optim.lr changed from 0.001 to 0.002 .*applied", resumed.stdout)
    rows = {m["step"]: m for m in read_metrics(tmp_path / "out/general/metrics.jsonl")}
    # no warm-up, linear decay over 6 steps: step 3 runs at lr * (6 - 2) / 6; the old code kept 0.001's schedule
    assert rows[3]["lr"] == pytest.approx(0.002 * 4 / 6, rel=1e-4)
    assert rows[2]["lr"] == pytest.approx(0.001 * 5 / 6, rel=1e-4)


@pytest.fixture(scope="module")
def finished_stage_1(tmp_path_factory, tokenizer_dir, vocab_size):
    """One pipeline run of stage 1 only; each test works on its own copy of the output."""
    tmp = tmp_path_factory.mktemp("finished")
    recipe = tiny_recipe(tmp, tokenizer_dir, vocab_size, train={"max_steps": 2, "save_every": 2})
    proc = run_cli(["pipeline", "--config", str(recipe), "--from-stage", "1", "--to-stage", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp


def copy_of(finished, tmp_path):
    shutil.copytree(finished / "out", tmp_path / "out")
    values = yaml.safe_load((finished / "recipe.yaml").read_text())
    values["output_dir"] = str(tmp_path / "out")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(values))
    return recipe


def pipeline(recipe, *overrides):
    return run_cli(["pipeline", "--config", str(recipe), "--from-stage", "1", "--to-stage", "1", *overrides])


@pytest.mark.slow
def test_the_pipeline_refuses_to_skip_a_stage_whose_recipe_changed(finished_stage_1, tmp_path, in_process):
    recipe = copy_of(finished_stage_1, tmp_path)
    assert "recipe" in json.loads((tmp_path / "out/general/stage_done.json").read_text())
    code, err = in_process(["pipeline", "--config", str(recipe), "--from-stage", "1", "--to-stage", "1",
                            "losses.weights.attention=0.25"])
    assert code == 2, err
    assert re.search(r"error: pipeline: the recipe of general changed since it finished: "
                     r"losses.weights.attention \(1.0 -> 0.25\); only .*; rm -r .*out/general", "\n".join(err))
    assert not any("Traceback" in line for line in err)
    skipped = pipeline(recipe, "train.log_every=5")  # how a run logs is no reason to retrain
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert "pipeline: general already done" in skipped.stdout


@pytest.mark.slow
def test_a_truncated_export_under_a_done_marker_is_rebuilt_by_a_rerun(finished_stage_1, tmp_path):
    from ernie_tiny_ds.runtime.export import export_problem

    recipe = copy_of(finished_stage_1, tmp_path)
    weights = tmp_path / "out/general/student/model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])  # as by a crash without fsync
    assert export_problem(weights.parent) is not None
    proc = pipeline(recipe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"warning: pipeline: the export of general in .*student does not load \(.*\); rebuilding it "
                     r"from .*checkpoints/step_00000002", proc.stdout), proc.stdout[-3000:]
    assert "pipeline: general already done" in proc.stdout
    assert export_problem(weights.parent) is None


@pytest.mark.slow
def test_a_resumed_teacher_finetuning_applies_a_new_lr_and_refuses_a_new_task_length(tmp_path, tokenizer_dir,
                                                                                    vocab_size, in_process):
    from test_finetune import recipe as finetune_recipe

    path = finetune_recipe(tmp_path, tokenizer_dir, vocab_size)
    common = ["finetune-teacher", "--config", str(path), "finetune.epochs=1"]
    (tmp_path / "out").mkdir(exist_ok=True)
    (tmp_path / "out" / "STOP").touch()
    first = run_cli(common)
    assert "stopped at step 1" in first.stdout, first.stderr[-3000:]
    # the distillation stages' settings are no part of finetuning: changing them refuses nothing
    code, err = in_process(common + ["task.max_seq_len=16", "losses.weights.hidden=0.5", "train.max_steps=3"])
    assert code == 2, err
    assert re.search(r"error: the recipe of finetuning changed since .*step_00000001 was written: "
                     r"task.max_seq_len \(32 -> 16\); only .*finetune.lr.*; rm -r .*teacher_finetuned.checkpoints ",
                     "\n".join(err)), err
    resumed = run_cli(common + ["finetune.lr=0.001", "losses.weights.hidden=0.5", "finetune.ship=last"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(r"warning: finetuning: finetune.lr changed from 0.003 to 0.001 .*applied", resumed.stdout)
    assert re.search(r"warning: finetuning: finetune.ship changed from None to 'last' .*applied", resumed.stdout)
    assert "resumed finetuning from" in resumed.stdout

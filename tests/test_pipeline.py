"""The four-stage pipeline end to end on 2 real ranks: finetuning, stages 1-4 passing the student on,
the finetuned teacher from stage 2, label losses only in stage 4, the report, and a kill -9 during
stage 3 that a re-run of the same command finishes without redoing stages 1-2."""
import json
import os
import signal
import subprocess
import time

import pytest
import transformers
import yaml
from distributed import REPO, deepspeed_cmd, env, read_metrics, run_ranks, tiny_recipe

from ernie_tiny_ds.distill.models import weights_fingerprint

pytestmark = pytest.mark.slow

STAGES = ["general", "general_enhanced", "task_adaptive", "task_specific"]


def pipeline_recipe(tmp_path, tokenizer_dir, vocab_size):
    recipe = tiny_recipe(
        tmp_path, tokenizer_dir, vocab_size,
        task={"name": "sentiment", "max_seq_len": 32},
        finetune={"epochs": 0.25, "lr": 1e-3, "micro_batch_size": 16},
        train={"max_steps": 6, "save_every": 3},
    )
    values = yaml.safe_load(recipe.read_text())
    # stage 3 runs long enough to be killed in the middle: the kill comes at its first checkpoint (step 10),
    # 110 steps before its end; few checkpoints, each of which costs more than a step
    values["stages"] = {"task_adaptive": {"train": {"max_steps": 120, "save_every": 10}},
                        "task_specific": {"train": {"max_steps": 8}}}
    recipe.write_text(yaml.safe_dump(values))
    return recipe


def wait_for_stage3_checkpoint(proc, out, log_path, timeout=420):
    deadline = time.time() + timeout
    # `latest` is written only after a checkpoint folder is complete and renamed; a `step_*` folder
    # can still be the `.partial` one, and a kill then leaves nothing to resume from
    latest = out / "task_adaptive" / "checkpoints" / "latest"
    while time.time() < deadline:
        assert proc.poll() is None, f"pipeline ended before stage 3 was killed:\n{log_path.read_text()[-5000:]}"
        if latest.is_file():
            return
        time.sleep(0.2)
    raise AssertionError(f"no stage-3 checkpoint within {timeout}s:\n{log_path.read_text()[-5000:]}")


def test_pipeline_runs_all_stages_and_survives_a_kill_in_stage_3(tmp_path, tokenizer_dir, vocab_size):
    recipe = pipeline_recipe(tmp_path, tokenizer_dir, vocab_size)
    out = tmp_path / "out"
    args = ["pipeline", "--config", str(recipe)]

    log_path = tmp_path / "first_run.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(deepspeed_cmd(args), env=env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            wait_for_stage3_checkpoint(proc, out, log_path)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-stage
            proc.wait(timeout=60)
    assert not (out / "task_adaptive" / "stage_done.json").exists()
    finished_before = {s: (out / s / "stage_done.json").stat().st_mtime_ns for s in STAGES[:2]}

    rerun = run_ranks(args, timeout=900)
    text = rerun.stdout + rerun.stderr
    assert "general already done" in text and "general_enhanced already done" in text
    assert "resumed task_adaptive from" in text, text[-5000:]
    assert "General Distillation done" not in text  # stage 1 was not redone
    assert {s: (out / s / "stage_done.json").stat().st_mtime_ns for s in STAGES[:2]} == finished_before

    done = {s: json.loads((out / s / "stage_done.json").read_text()) for s in STAGES}
    finetuned = str(out / "teacher_finetuned")
    # stage 1: pretrained (here inline) teacher, fresh student; then each stage from the previous export
    assert done["general"]["teacher"] == "inline config" and done["general"]["student_init"] == "fresh"
    for previous, stage in zip(STAGES, STAGES[1:]):
        assert done[stage]["teacher"] == finetuned and done[stage]["teacher_finetuned"] is True
        assert done[stage]["student_init"] == str(out / previous / "student")
        exported = transformers.AutoModel.from_pretrained(out / previous / "student")
        assert done[stage]["student_init_fingerprint"] == pytest.approx(weights_fingerprint(exported), rel=1e-9)
    # only stage 4 has the soft- and hard-label terms, in its config and in its logged losses
    for stage in STAGES:
        terms = set(done[stage]["loss_terms"])
        logged = set(read_metrics(out / stage / "metrics.jsonl")[-1])
        if stage == "task_specific":
            assert {"soft_label", "hard_label"} <= terms and {"soft_label", "hard_label"} <= logged
        else:
            assert not {"soft_label", "hard_label"} & (terms | logged)
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(out / "task_specific" / "student")
    assert classifier.config.num_labels == 2

    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == STAGES
    assert all(isinstance(s["final_loss"], float) for s in report["stages"])
    for who in ("teacher", "student"):
        assert report[who]["metrics"]["accuracy"] is not None and report[who]["params"] > 0
    assert report["teacher"]["params"] > report["student"]["params"]
    assert report["retained"] == pytest.approx(
        report["student"]["metrics"][report["main_metric"]] / report["teacher"]["metrics"][report["main_metric"]])
    assert report["speedup"] > 0
    md = (out / "report.md").read_text()
    for section in ("## Stages", "### Loss curves", "## Quality", "## Size and speed"):
        assert section in md
    for stage in STAGES:
        assert (out / f"loss_{stage}.png").stat().st_size > 1000


def test_a_stop_request_during_teacher_finetuning_stops_the_pipeline_at_a_checkpoint(tmp_path, tokenizer_dir,
                                                                                      vocab_size):
    recipe = pipeline_recipe(tmp_path, tokenizer_dir, vocab_size)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "STOP").touch()  # what Slurm's USR1 handler writes
    proc = run_ranks(["pipeline", "--config", str(recipe)], timeout=600)
    assert "finetune: stopped at step 1" in proc.stdout
    assert "pipeline: stopped during finetune; run the same command to resume" in proc.stdout
    assert (out / "teacher_finetuned.checkpoints").is_dir() and not (out / "teacher_finetuned").exists()
    assert not any((out / stage).exists() for stage in STAGES)  # no stage ran on a missing teacher

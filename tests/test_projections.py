"""The hidden/embedding projections carry from stage to stage (losses.carry_projections): each stage
writes them beside its export, the next one starts from them; with the switch off it starts fresh."""
import json

import pytest
import torch
import transformers
from distributed import run_cli, tiny_recipe, tiny_teacher
from safetensors.torch import load_file

from ernie_tiny_ds.config import LossConfig
from ernie_tiny_ds.distill.loss_terms import stage_terms
from ernie_tiny_ds.distill.objective import (
    PROJECTIONS_FILE,
    DistillationObjective,
    projection_state,
    projections_fingerprint,
)
from ernie_tiny_ds.runtime.export import consolidated_state_dict
from ernie_tiny_ds.stages import STAGE_SPECS


def tiny_student(hidden=32):
    config = transformers.BertConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64)
    return transformers.BertModel(config)


def test_projections_load_when_widths_match_and_stay_fresh_otherwise():
    torch.manual_seed(0)
    source = DistillationObjective(tiny_student(), 64, [2, 4], LossConfig(), terms=stage_terms(STAGE_SPECS["general"]))
    saved = projection_state(source.state_dict())
    assert sorted(saved) == ["embedding_proj.bias", "embedding_proj.weight", "hidden_proj.bias", "hidden_proj.weight"]
    target = DistillationObjective(tiny_student(), 64, [2, 4], LossConfig(), terms=stage_terms(STAGE_SPECS["general"]))
    assert target.load_projections(saved) is None
    for key, value in projection_state(target.state_dict()).items():
        assert torch.equal(value, saved[key])
    wider = DistillationObjective(tiny_student(), 96, [2, 4], LossConfig(), terms=stage_terms(STAGE_SPECS["general"]))
    before = {k: v.clone() for k, v in projection_state(wider.state_dict()).items()}
    why = wider.load_projections(saved)
    assert "maps 32 -> 64, this stage needs 32 -> 96" in why
    assert all(torch.equal(v, before[k]) for k, v in projection_state(wider.state_dict()).items())


def finetuned_teacher(folder, tokenizer_dir, vocab_size):
    """A classifier of the inline teacher's width (stage 2 needs a finetuned teacher)."""
    torch.manual_seed(1)
    config = transformers.BertConfig(**{k: v for k, v in tiny_teacher(vocab_size).items() if k != "model_type"},
                                     num_labels=2)
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return str(folder)


@pytest.mark.slow
def test_stage_2_starts_from_stage_1_projections_and_fresh_when_switched_off(tmp_path, tokenizer_dir, vocab_size):
    teacher = finetuned_teacher(tmp_path / "ft", tokenizer_dir, vocab_size)
    recipe = tiny_recipe(tmp_path, tokenizer_dir, vocab_size, teacher={"finetuned_path": teacher},
                         train={"max_steps": 3, "save_every": 3})
    out = tmp_path / "out"
    proc = run_cli(["pipeline", "--config", str(recipe), "--from-stage", "1", "--to-stage", "2"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # stage 1 wrote its trained projections beside its export, equal to its final checkpoint's
    carried = load_file(str(out / "general" / PROJECTIONS_FILE))
    final = projection_state(consolidated_state_dict(out / "general" / "checkpoints" / "step_00000003"))
    assert sorted(carried) == sorted(final) and all(torch.equal(carried[k], final[k].float()) for k in final)
    assert not any("proj" in p.name for p in (out / "general" / "student").iterdir())  # not in the HF folder
    done1 = json.loads((out / "general" / "stage_done.json").read_text())
    done2 = json.loads((out / "general_enhanced" / "stage_done.json").read_text())
    assert done1["projections_init"] == "fresh"
    assert done2["projections_init"] == str(out / "general" / PROJECTIONS_FILE)
    assert done2["projections_init_fingerprint"] == pytest.approx(projections_fingerprint(carried), rel=1e-9)
    assert done1["projections_init_fingerprint"] != pytest.approx(done2["projections_init_fingerprint"], rel=1e-6)

    # stage 2 run alone from stage 1's student finds them beside it; with the switch off it starts fresh
    for carry, expected in (("true", str(out / "general" / PROJECTIONS_FILE)), ("false", "fresh")):
        alone = tmp_path / f"alone_{carry}"
        proc = run_cli(["distill", "--config", str(recipe), "--stage", "general_enhanced", f"output_dir={alone}",
                        f"student.path={out / 'general' / 'student'}", f"losses.carry_projections={carry}",
                        "train.max_steps=1"], timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        done = json.loads((alone / "general_enhanced" / "stage_done.json").read_text())
        assert done["projections_init"] == expected
        if carry == "true":
            assert done["projections_init_fingerprint"] == pytest.approx(projections_fingerprint(carried), rel=1e-9)
        else:
            assert done["projections_init_fingerprint"] != pytest.approx(projections_fingerprint(carried), rel=1e-6)

        if carry == "true":
            # --skip-stage passes over a stage even when its folder is there: stage 3 starts from stage 1's
            # student and projections, not from the finished stage 2 in the same output_dir
            proc = run_cli(["pipeline", "--config", str(recipe), "--from-stage", "1", "--to-stage", "3",
                            "--skip-stage", "general_enhanced", "stages.task_adaptive.train.max_steps=1",
                            "task.name=sentiment"], timeout=600)
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            assert "general already done" in proc.stdout and "general_enhanced" not in proc.stdout.split("done (")[-1]
            done3 = json.loads((out / "task_adaptive" / "stage_done.json").read_text())
            assert done3["student_init"] == str(out / "general" / "student")
            assert done3["projections_init"] == str(out / "general" / PROJECTIONS_FILE)
            marker = json.loads((out / "pipeline_done.json").read_text())
            assert marker["skipped"] == ["general_enhanced"] and marker["stages"] == ["general", "task_adaptive"]

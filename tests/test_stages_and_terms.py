"""Stages and loss terms are data: a new loss term is one entry of distill/loss_terms.py (every stage whose
forward gives what it reads trains on it), a new stage one entry of stages.py, and the objective, the
recipe, the resume fingerprints and the pipeline take them without another edit."""
import json
import sys
from types import SimpleNamespace

import pytest
import torch
import transformers

from ernie_tiny_ds import losses as L
from ernie_tiny_ds.cli import main
from ernie_tiny_ds.config import LossConfig, load_recipe
from ernie_tiny_ds.distill import loss_terms
from ernie_tiny_ds.distill.models import FeatureCapture
from ernie_tiny_ds.distill.objective import DistillationObjective, TeacherOutput
from ernie_tiny_ds.errors import ConfigError
from ernie_tiny_ds.runtime import recipe_changes
from ernie_tiny_ds.stages import FEATURES, STAGE_SPECS, StageSpec, shipping_stage


def toy_term(x: loss_terms.TermInputs) -> torch.Tensor:
    """Mean square distance of the student's logits from 1: reads only what it declares."""
    return (x.student_logits.float() - 1).pow(2).mean()


def tiny_classifier(hidden, layers, seed):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                                  intermediate_size=2 * hidden, num_labels=3, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg).eval()


def test_a_registered_loss_term_joins_the_stages_that_can_feed_it_and_is_weighted_into_their_total(monkeypatch):
    task_specific = STAGE_SPECS["task_specific"]
    before = {name: loss_terms.stage_terms(spec) for name, spec in STAGE_SPECS.items()}
    # the one edit: an entry of LOSS_TERMS (here patched in), no stage lists it
    monkeypatch.setitem(loss_terms.LOSS_TERMS, "toy", loss_terms.LossTerm("toy", toy_term, frozenset({"logits"}), 0.5))
    after = {name: loss_terms.stage_terms(spec) for name, spec in STAGE_SPECS.items()}
    assert after == {**before, "task_specific": (*before["task_specific"], "toy")}  # it reads logits: stage 4 only
    teacher, student = tiny_classifier(16, 2, seed=0), tiny_classifier(8, 1, seed=1)
    capture = FeatureCapture(teacher, layers=[2])
    ids = torch.randint(1, 40, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    types, labels = torch.zeros_like(ids), torch.tensor([0, 2, 1])
    with torch.no_grad(), capture.recording() as features:
        teacher(input_ids=ids, attention_mask=mask)
    teacher_out = TeacherOutput(features, torch.randn(3, 3) * 2)  # logits far from the student's

    def run(terms, weights):
        torch.manual_seed(2)  # the same projections in every objective
        objective = DistillationObjective(student, 16, [2], LossConfig(weights=weights), terms=terms)
        return objective(ids, mask, types, teacher_out, labels)

    without_total, without = run(before["task_specific"], {})
    default_total, default = run(loss_terms.stage_terms(task_specific), {})  # the registered default weight
    weighted_total, weighted = run(loss_terms.stage_terms(task_specific), {"toy": 3.0})
    assert "toy" not in without and list(default) == [*before["task_specific"], "toy"]
    with torch.no_grad():  # the float64 reference of the toy term and of the classification soft-label term
        logits = student.double()(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        student.float()
    toy_ref = float((logits - 1).pow(2).mean())
    soft_ref = float(L.soft_label_loss(logits, teacher_out.logits.double()))
    assert float(weighted["toy"]) == pytest.approx(toy_ref, rel=1e-5)
    assert float(weighted["soft_label"]) == pytest.approx(soft_ref, rel=1e-5)
    assert float(default_total.detach() - without_total.detach()) == pytest.approx(0.5 * toy_ref, rel=1e-4)
    assert float(weighted_total.detach() - without_total.detach()) == pytest.approx(3.0 * toy_ref, rel=1e-4)
    # the recipe takes the new term's weight by name, with no config edit
    assert load_recipe(None, ["teacher.config={}", "losses.weights.toy=3"]).losses.weights == {"toy": 3.0}


def test_a_term_off_by_default_counts_only_where_a_recipe_weights_it_and_leaves_old_fingerprints_alone(monkeypatch):
    recipe = load_recipe(None, ["teacher.config={}", "task.name=sentiment"])
    fingerprints = {stage: recipe_changes.fingerprint(recipe, stage) for stage in STAGE_SPECS}
    calls = []

    def latent_toy(x: loss_terms.TermInputs) -> torch.Tensor:
        calls.append(1)
        return x.student.hidden[-1].float().pow(2).mean()

    monkeypatch.setitem(loss_terms.LOSS_TERMS, "toy", loss_terms.LossTerm("toy", latent_toy, frozenset({"features"}),
                                                                           0.0))
    assert all("toy" in loss_terms.stage_terms(spec) for spec in STAGE_SPECS.values())  # features: every stage
    # registered but off: a run made before it was registered resumes (its fingerprints are unchanged)
    assert {stage: recipe_changes.fingerprint(recipe, stage) for stage in STAGE_SPECS} == fingerprints
    # switched on for one stage by that stage's recipe key: that stage's fingerprint alone changes
    on = load_recipe(None, ["teacher.config={}", "task.name=sentiment", "stages.general.losses.weights.toy=0.5"])
    changed = [stage for stage in STAGE_SPECS if recipe_changes.fingerprint(on, stage) != fingerprints[stage]]
    assert changed == ["general"]
    assert recipe_changes.fingerprint(on, "general")["losses"]["weights"]["toy"] == 0.5
    student = tiny_classifier(8, 1, seed=1).bert
    for weights, counted in (({}, False), ({"toy": 0.5}, True)):
        objective = DistillationObjective(student, 8, [1], LossConfig(weights=weights),
                                          terms=loss_terms.stage_terms(STAGE_SPECS["general"]))
        assert ("toy" in objective.weights()) == counted  # weight 0: never computed


def test_a_term_that_reads_logits_names_what_is_missing():
    student = tiny_classifier(8, 1, seed=1).bert  # no task head
    objective = DistillationObjective(student, 16, [1], LossConfig(), terms=("hidden", "soft_label"))
    ids = torch.randint(1, 40, (2, 5))
    teacher = tiny_classifier(16, 1, seed=0)
    capture = FeatureCapture(teacher, layers=[1])
    with torch.no_grad(), capture.recording() as features:
        out = TeacherOutput(features, teacher(input_ids=ids).logits)
    with pytest.raises(ValueError, match="the soft_label loss term needs task logits, but the student has no task"):
        objective(ids, torch.ones_like(ids), torch.zeros_like(ids), out)
    with pytest.raises(ValueError, match=r"unregistered loss terms \['hiden'\]"):
        DistillationObjective(student, 16, [1], LossConfig(), terms=("hiden",))


def test_a_registered_stage_is_run_by_the_pipeline_in_order(tmp_path, monkeypatch):
    from ernie_tiny_ds.workflows import pipeline

    toy = StageSpec("toy", "Toy Distillation", False, "general", FEATURES)
    monkeypatch.setitem(STAGE_SPECS, "toy", toy)
    ran = []

    def fake_run_stage(recipe, stage):
        ran.append((stage, recipe.student.path, recipe.student.projections))
        (tmp_path / stage / "student").mkdir(parents=True)
        (tmp_path / stage / "student" / "config.json").write_text("{}")
        return SimpleNamespace(complete=True)

    monkeypatch.setattr(pipeline, "run_stage", fake_run_stage)
    monkeypatch.setattr(pipeline, "init_distributed", lambda *args: (0, 1))
    monkeypatch.setattr(pipeline, "shipped_student", lambda recipe, out: out / shipping_stage().name / "student")
    reported = []
    monkeypatch.setattr(pipeline, "build_report", lambda recipe, out, skipped: reported.append(recipe.student.path))
    assert [name for name, _ in pipeline.pipeline_steps()][-2:] == ["task_specific", "toy"]
    assert pipeline.parse_stage("toy") == pipeline.parse_stage("5") == 5
    recipe = load_recipe(None, ["teacher.config={}", f"output_dir={tmp_path}", "teacher.finetuned_path=/teacher",
                                "student.path=/start", "task.name=sentiment"])
    assert pipeline.run_pipeline(recipe, pipeline.parse_stage("general"), pipeline.parse_stage("toy"))
    names = [*list(STAGE_SPECS)]
    assert [stage for stage, _, _ in ran] == names
    assert [start for _, start, _ in ran] == ["/start"] + [str(tmp_path / n / "student") for n in names[:-1]]
    assert reported == [str(tmp_path / "task_specific" / "student")]  # the shipping stage's student is scored
    done = json.loads((tmp_path / pipeline.PIPELINE_DONE).read_text())
    assert done["stages"] == names and done["range"] == [1, 5]


def test_an_old_loss_weight_key_says_its_new_name_in_one_line(tmp_path, capsys, monkeypatch):
    from ernie_tiny_ds.runtime import rank_registry

    def report(line, code=1):  # the one-line exit (os._exit in production) as SystemExit in this process
        print(line, file=sys.stderr, flush=True)
        raise SystemExit(code)

    monkeypatch.setattr(rank_registry, "report_and_exit", report)
    monkeypatch.delenv("RANK", raising=False)
    for override, section, term in (("losses.hidden_weight=0.5", "losses", "hidden"),
                                    ("stages.task_specific.losses.soft_label_weight=2",
                                     "stages.task_specific.losses", "soft_label")):
        with pytest.raises(ConfigError) as raised:
            load_recipe(None, ["teacher.config={}", override])
        assert str(raised.value) == f"{section}.{term}_weight: renamed to {section}.weights.{term}"
    recipe = tmp_path / "old.yaml"
    recipe.write_text("teacher:\n  config: {}\nlosses:\n  attention_weight: 0.5\n")
    with pytest.raises(SystemExit) as exited:
        main(["distill", "--config", str(recipe)])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: losses.attention_weight: renamed to losses.weights.attention"]


def test_loss_weights_refuse_unknown_and_negative_names_and_merge_per_stage_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"^unknown loss term 'losses.weights.hiden'; did you mean "
                                          r"'losses.weights.hidden'\?$"):
        load_recipe(None, ["teacher.config={}", "losses.weights.hiden=1"])
    with pytest.raises(ConfigError, match=r"^losses.weights.soft_label must be >= 0, got -1.0$"):
        load_recipe(None, ["teacher.config={}", "losses.weights.soft_label=-1"])
    path = tmp_path / "r.yaml"
    path.write_text("teacher:\n  config: {}\nlosses:\n  weights: {hidden: 0.5}\n"
                    "stages:\n  task_specific:\n    losses:\n      weights: {soft_label: 2}\n")
    recipe = load_recipe(str(path))
    assert recipe.for_stage("task_specific").losses.weights == {"hidden": 0.5, "soft_label": 2.0}
    assert recipe.for_stage("general").losses.weights == {"hidden": 0.5}
    # a stage's fingerprint holds its own terms' weights, defaults included
    assert recipe_changes.fingerprint(recipe, "general")["losses"]["weights"] == {
        "embedding": 1.0, "hidden": 0.5, "attention": 1.0}
    assert recipe_changes.fingerprint(recipe, "task_specific")["losses"]["weights"] == {
        "embedding": 1.0, "hidden": 0.5, "attention": 1.0, "soft_label": 2.0, "hard_label": 1.0}


def test_every_stage_reads_known_inputs_and_has_a_head_and_a_whole_teacher_where_its_terms_read_logits():
    assert shipping_stage().name == "task_specific"
    assert {name: loss_terms.stage_terms(spec) for name, spec in STAGE_SPECS.items()} == {
        "general": ("embedding", "hidden", "attention"), "general_enhanced": ("embedding", "hidden", "attention"),
        "task_adaptive": ("embedding", "hidden", "attention"),
        "task_specific": ("embedding", "hidden", "attention", "soft_label", "hard_label")}  # ERNIE-Tiny's
    for spec in STAGE_SPECS.values():
        assert spec.reads <= loss_terms.NEEDS, spec.name
        reads_logits = loss_terms.terms_need(loss_terms.stage_terms(spec), "logits")
        assert spec.task_head == reads_logits and (spec.teacher_depth == "logits") == reads_logits, spec.name
        assert spec.selects_on is None or spec.task_head, spec.name  # selection scores the task head

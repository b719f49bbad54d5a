"""Recipes: YAML + overrides into typed sections; every mistake names its key."""
import pytest
import yaml

from ernie_tiny_ds.config import ConfigError, load_recipe


def write(tmp_path, values, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return path


BASE = {"output_dir": "out", "teacher": {"config": {"model_type": "bert", "vocab_size": 50, "hidden_size": 16,
                                                    "num_hidden_layers": 2, "num_attention_heads": 2,
                                                    "intermediate_size": 32}}}


def test_defaults_are_the_tinybert4_student(tmp_path):
    r = load_recipe(write(tmp_path, BASE))
    s = r.student
    assert (s.num_hidden_layers, s.hidden_size, s.num_attention_heads, s.intermediate_size) == (4, 312, 12, 1200)
    assert r.losses.layer_map == "uniform" and r.deepspeed.config == "zero1"


def test_overrides_are_typed_and_nested(tmp_path):
    r = load_recipe(write(tmp_path, BASE), ["train.max_steps=7", "optim.lr=1e-3", "losses.layer_map=[1,2,3,4]",
                                            "deepspeed.overrides.zero_optimization.stage=2", "output_dir=/x y"])
    assert r.train.max_steps == 7 and r.optim.lr == pytest.approx(1e-3)
    assert r.losses.layer_map == [1, 2, 3, 4]
    assert r.deepspeed.overrides == {"zero_optimization": {"stage": 2}}
    assert r.output_dir == "/x y"


def test_unknown_key_names_the_closest_valid_one(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'train.max_step'; did you mean 'train.max_steps'"):
        load_recipe(write(tmp_path, BASE), ["train.max_step=3"])
    with pytest.raises(ConfigError, match=r"unknown key 'loss'; did you mean 'losses'"):
        load_recipe(write(tmp_path, {**BASE, "loss": {}}))


@pytest.mark.parametrize("override,message", [
    ("train.max_steps=ten", r"train.max_steps: expected an integer, got str 'ten'"),
    ("train.max_steps=1.5", r"train.max_steps: expected an integer"),
    ("train.max_steps=-1", r"train.max_steps must be > 0"),
    ("train.precision=fp8", r"train.precision: 'fp8' is not one of"),
    ("losses.temperature=0", r"losses.temperature must be > 0"),
    ("losses.layer_map=every-other", r"losses.layer_map: 'every-other' is not"),
    ("optim.betas=[0.9]", r"optim.betas must be two numbers"),
    ("teacher.zero3=maybe", r"teacher.zero3: expected true or false"),
    ("student.hidden_size=100", r"student.hidden_size \(100\) must be divisible"),
    ("stages.genral.train={}", r"unknown key 'stages.genral'; did you mean 'stages.general'"),
    ("stages.general.train.max_step=3", r"unknown key 'train.max_step'"),
])
def test_bad_values_name_their_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(write(tmp_path, BASE), [override])


def test_missing_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: not valid YAML"):
        load_recipe(bad)


def test_teacher_is_required_and_exclusive(tmp_path):
    with pytest.raises(ConfigError, match="teacher.path"):
        load_recipe(write(tmp_path, {"output_dir": "o"}))
    with pytest.raises(ConfigError, match="not both"):
        load_recipe(write(tmp_path, BASE), ["teacher.path=/tmp"])


def test_stage_overrides_apply_to_that_stage_only(tmp_path):
    r = load_recipe(write(tmp_path, {**BASE, "stages": {"task_specific": {"train": {"max_steps": 3},
                                                                           "losses": {"temperature": 2.0}}}}))
    ts = r.for_stage("task_specific")
    assert ts.train.max_steps == 3 and ts.losses.temperature == 2.0
    assert r.for_stage("general").train.max_steps == r.train.max_steps


def test_the_command_line_wins_over_the_recipes_stage_overrides(tmp_path):
    path = write(tmp_path, {**BASE, "stages": {"task_specific": {"train": {"max_steps": 3, "save_every": 2},
                                                                 "optim": {"lr": 5e-4}}}})
    r = load_recipe(path, ["train.max_steps=20", "optim.warmup_ratio=0.2"])
    ts = r.for_stage("task_specific")
    assert ts.train.max_steps == 20 and ts.train.save_every == 2  # only the keys given on the command line
    assert ts.optim.lr == pytest.approx(5e-4) and ts.optim.warmup_ratio == pytest.approx(0.2)
    assert r.for_stage("general").train.max_steps == 20
    # a stage key on the command line is the most specific: it wins over the general one, for its stage only
    r = load_recipe(path, ["train.max_steps=20", "stages.task_specific.train.max_steps=7"])
    assert r.for_stage("task_specific").train.max_steps == 7 and r.for_stage("general").train.max_steps == 20
    # survives the copies the pipeline makes, and is not a recipe key
    import dataclasses
    assert dataclasses.replace(r, output_dir="x").for_stage("general").train.max_steps == 20
    with pytest.raises(ConfigError, match="'command_line': it is not a recipe setting"):
        load_recipe(path, ["command_line=[train.max_steps=1]"])


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path):
    (tmp_path / "corpus").mkdir()
    r = load_recipe(write(tmp_path, {**BASE, "data": {"corpus": "corpus"}}))
    assert r.data.corpus == str((tmp_path / "corpus").resolve())


@pytest.mark.parametrize("name", ["demo", "ernie_tiny_en"])
def test_bundled_recipes_load_by_name_and_are_valid(name, tmp_path):
    with pytest.raises(ConfigError, match="teacher.path"):
        load_recipe(name)  # the teacher is the user's to give
    r = load_recipe(name, [f"teacher.path={tmp_path}"])
    assert (r.student.num_hidden_layers, r.student.hidden_size, r.student.num_attention_heads,
            r.student.intermediate_size) == (4, 312, 12, 1200)
    for stage in ("general", "general_enhanced", "task_adaptive", "task_specific"):
        assert r.for_stage(stage).train.max_steps > 0


@pytest.mark.parametrize("zero", ["zero0", "zero1", "zero2", "zero3", "zero3_offload"])
def test_bundled_deepspeed_configs_get_the_fused_torch_adamw(zero, tmp_path):
    from ernie_tiny_ds.runtime.ds_config import build_ds_config

    r = load_recipe(write(tmp_path, BASE), [f"deepspeed.config={zero}", "optim.lr=3e-4"])
    params = build_ds_config(r, world_size=2)["optimizer"]["params"]
    assert params["fused"] is True and params["torch_adam"] is True and params["lr"] == pytest.approx(3e-4)
    # a config that chooses its AdamW form keeps it
    r = load_recipe(write(tmp_path, BASE), [f"deepspeed.config={zero}",
                                            "deepspeed.overrides.optimizer.params.foreach=true"])
    params = build_ds_config(r, world_size=2)["optimizer"]["params"]
    assert "fused" not in params and params["foreach"] is True


def test_weight_decay_skips_biases_and_layer_norms():
    import transformers

    from ernie_tiny_ds.runtime.engines import parameter_groups

    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32)
    model = transformers.BertModel(config)
    model.pooler.requires_grad_(False)  # frozen parameters are not the optimizer's
    decay, no_decay = parameter_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert "embeddings.word_embeddings.weight" in decayed
    assert "encoder.layer.0.attention.self.query.weight" in decayed
    assert "encoder.layer.1.output.LayerNorm.weight" in kept and "encoder.layer.0.attention.self.query.bias" in kept
    assert all(n.endswith("bias") or "LayerNorm" in n for n in kept)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | kept == trainable and not decayed & kept and not any(n.startswith("pooler") for n in trainable)

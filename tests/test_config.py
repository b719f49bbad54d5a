"""Recipes: YAML + overrides into typed sections; every mistake names its key."""
import json

import pytest
import yaml

from ernie_tiny_ds.config import load_recipe
from ernie_tiny_ds.errors import ConfigError


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
    ("stages.general.train.max_step=3", r"unknown key 'stages.general.train.max_step'; did you mean "
                                        r"'stages.general.train.max_steps'"),
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
    from ernie_tiny_ds.runtime.engine_settings import EngineSettings

    r = load_recipe(write(tmp_path, BASE), [f"deepspeed.config={zero}", "optim.lr=3e-4"])
    params = build_ds_config(r.deepspeed, EngineSettings.of_stage(r), world_size=2)["optimizer"]["params"]
    assert params["fused"] is True and params["torch_adam"] is True and params["lr"] == pytest.approx(3e-4)
    # a config that chooses its AdamW form keeps it
    r = load_recipe(write(tmp_path, BASE), [f"deepspeed.config={zero}",
                                            "deepspeed.overrides.optimizer.params.foreach=true"])
    params = build_ds_config(r.deepspeed, EngineSettings.of_stage(r), world_size=2)["optimizer"]["params"]
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


# --------------------------------------------------------------------------- rules as field metadata
def _outside(bounds, integer: bool):
    """A value just outside `bounds`."""
    step = 1 if integer else 0.5
    if bounds.low is not None:
        return bounds.low if bounds.low_open else bounds.low - step
    return bounds.high if bounds.high_open else bounds.high + step


def test_each_fields_bounds_are_checked_in_its_section_and_in_stage_overrides():
    import typing

    from ernie_tiny_ds.config import Recipe
    from ernie_tiny_ds.config.rules import rules_of, settings
    from ernie_tiny_ds.config.stage_overrides import STAGE_SECTIONS

    bounded = [(key, f) for key, f in settings(Recipe) if rules_of(f).bounds is not None]
    assert len(bounded) > 30  # the walk reaches every section
    for key, f in bounded:
        section, name = key.split(".")
        hint = typing.get_type_hints(typing.get_type_hints(Recipe)[section])[name]
        integer = hint is int or int in typing.get_args(hint)  # Optional[int], int or "auto"
        bad = _outside(rules_of(f).bounds, integer)
        keys = [key] + ([f"stages.general.{key}"] if key.split(".")[0] in STAGE_SECTIONS else [])
        for where in keys:
            with pytest.raises(ConfigError) as info:
                load_recipe(None, ["teacher.config={}", f"{where}={bad}"])
            message = str(info.value)
            assert message.startswith(f"{where} must be ") and f"got {bad}" in message and "\n" not in message


def test_a_stage_override_is_a_typed_partial_section(tmp_path):
    cases = {"stages.general.train.max_step=3": "unknown key 'stages.general.train.max_step'; did you mean "
                                                "'stages.general.train.max_steps'?",
             "stages.task_specific.optim.lr=fast": "stages.task_specific.optim.lr: expected a number, got str 'fast'",
             "stages.general.losses.kernels=cuda": "stages.general.losses.kernels: 'cuda' is not one of",
             "stages.general.task.name=x": "unknown key 'stages.general.task'; did you mean 'stages.general.data'?"}
    for override, message in cases.items():
        with pytest.raises(ConfigError) as info:
            load_recipe(write(tmp_path, BASE), [override])
        assert str(info.value).startswith(message) and "\n" not in str(info.value), str(info.value)
    with pytest.raises(ConfigError, match=r"^unknown key 'stages.general.losses.temprature'; did you mean "
                                          r"'stages.general.losses.temperature'\?$"):
        load_recipe(write(tmp_path, {**BASE, "stages": {"general": {"losses": {"temprature": 2}}}}))
    # typed at load: coerced like the section (an integer widens to a float), the rest left unset
    r = load_recipe(write(tmp_path, {**BASE, "stages": {"general": {"losses": {"temperature": 2}}}}))
    assert r.stages["general"].given() == {"train": {}, "optim": {}, "losses": {"temperature": 2.0}, "data": {}}
    assert isinstance(r.stages["general"].losses.temperature, float)
    assert r.for_stage("general").losses.temperature == 2.0 and r.for_stage("general").train == r.train


def _another(value, hint):
    """A different value of the field's type (None: no generic one)."""
    import typing
    optional = typing.get_origin(hint) is typing.Union
    options = [a for a in typing.get_args(hint) if a is not type(None)] if optional else [hint]
    if typing.get_origin(hint) is typing.Literal:
        return next(c for c in typing.get_args(hint) if c != value)
    if typing.get_origin(options[0]) is typing.Literal:
        return next(c for c in typing.get_args(options[0]) if c != value)
    if options[0] is bool:
        return not value
    if options[0] in (int, float):
        return options[0](value * 2 + 1) if isinstance(value, (int, float)) else options[0](3)  # None, "auto"
    return None


def test_what_a_resume_or_skip_may_change_is_each_fields_metadata(tmp_path):
    """Every setting in a fingerprint is changed on its own: the change is accepted exactly when the
    field's metadata marks it safe on that occasion, and refused naming the key otherwise."""
    import copy
    import typing

    from ernie_tiny_ds.config import Recipe
    from ernie_tiny_ds.config.dotted import flatten
    from ernie_tiny_ds.config.rules import SafeOn, rules_of, settings
    from ernie_tiny_ds.runtime import recipe_changes

    base = ["teacher.config={}", "task.name=sentiment", "task.max_seq_len=32"]
    occasions = [(SafeOn.RESUME, recipe_changes.SAFE_ON_RESUME, lambda r: recipe_changes.fingerprint(r, "general")),
                 (SafeOn.SKIP, recipe_changes.SAFE_ON_SKIP, lambda r: recipe_changes.fingerprint(r, "task_specific")),
                 (SafeOn.FINETUNE_RESUME, recipe_changes.FINETUNE_SAFE_ON_RESUME, recipe_changes.finetune_fingerprint)]
    sections = typing.get_type_hints(Recipe)
    hints = {key: typing.get_type_hints(sections[key.split(".")[0]])[key.split(".")[1]]
             for key, _ in settings(Recipe) if "." in key}
    for occasion, safe, fingerprint in occasions:
        recipe = load_recipe(None, base)
        old = fingerprint(recipe)
        accepted, refused = set(), set()
        for key, f in settings(Recipe):
            if key not in flatten(old):
                continue
            changed = _another(flatten(old)[key], hints.get(key))
            try:  # a real change of the recipe where a generic value is valid, else of the fingerprint
                new = fingerprint(load_recipe(None, base + [f"{key}={json.dumps(changed)}"]))
            except ConfigError:
                new = old
            if new == old or changed is None:
                new = copy.deepcopy(old)
                section, name = key.split(".")
                new[section][name] = ["changed"]
            try:
                recipe_changes.check(old, new, safe, "what", "remedy")
                accepted.add(key)
            except ConfigError as exc:
                assert str(exc).startswith(f"what: {key} (") and "\n" not in str(exc)
                refused.add(key)
            assert (key in accepted) == bool(rules_of(f).safe_on & occasion), (occasion, key)
        assert accepted == set(safe) and len(refused) > 10, (occasion, accepted)

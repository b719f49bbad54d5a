"""What the recipe says is what runs (issue 24 §3), and the mistakes of §4 that printed a traceback:
each is one line naming the key, file or line, before any work starts."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from distributed import REPO, env, tiny_recipe, tiny_teacher

from ernie_tiny_ds.config import TaskConfig, load_recipe
from ernie_tiny_ds.errors import ConfigError, DataError, UserError

TEACHER = tiny_teacher(vocab_size=60)  # 128 positions
BASE = f"""\
output_dir: out
teacher:
  config: {json.dumps(TEACHER)}
data:
  max_seq_len: 32
"""


def write(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder / name


def one_line_error(exc_info, *parts: str) -> str:
    message = str(exc_info.value)
    assert "\n" not in message, message
    for part in parts:
        assert part in message, message
    return message


# --------------------------------------------------------------------------- duplicate keys
def test_a_repeated_key_at_any_depth_names_both_lines(tmp_path):
    top = write(tmp_path, BASE + "train:\n  max_steps: 5\ntrain:\n  log_every: 2\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(top)
    one_line_error(info, f"{top}:8: key 'train' repeats the one at line 6")

    nested = write(tmp_path, BASE + "deepspeed:\n  overrides:\n    zero_optimization:\n      stage: 1\n"
                                    "      reduce_bucket_size: 10\n      stage: 2\n")
    with pytest.raises(ConfigError) as info:
        load_recipe(nested)
    one_line_error(info, f"{nested}:11: key 'deepspeed.overrides.zero_optimization.stage' repeats the one at line 9")

    with pytest.raises(ConfigError, match="key 'a' repeats"):
        load_recipe(write(tmp_path, BASE), ["deepspeed.overrides={a: 1, a: 2}"])
    # a key that overrides one a `<<:` merge brought in is what merges are for
    merged = write(tmp_path, BASE + "stages:\n  general:\n    train: &common {max_steps: 3, log_every: 1}\n"
                                    "  general_enhanced:\n    train:\n      <<: *common\n      max_steps: 4\n")
    assert load_recipe(merged).for_stage("general_enhanced").train.max_steps == 4


# --------------------------------------------------------------------------- alias bombs
def billion_laughs(levels: int = 9) -> str:
    """The classic bomb: each level lists the previous one 9 times (9**levels strings from a few hundred bytes)."""
    lines = ['    a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefghij", "bcdefghijk"[:levels - 1]):
        lines.append(f"    {name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "deepspeed:\n  overrides:\n" + "\n".join(lines) + "\n"


@pytest.mark.slow
def test_an_alias_bomb_under_deepspeed_overrides_fails_fast_in_one_line(tmp_path):
    bomb = billion_laughs()
    assert len(bomb.encode()) < 600
    recipe = write(tmp_path, BASE + bomb)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "ernie_tiny_ds.cli", "distill", "--config", str(recipe)],
                          env=env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "alias bomb" in errors[0] and str(recipe) in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and time.monotonic() - started < 120

    with pytest.raises(ConfigError, match="YAML aliases expand deepspeed.overrides"):  # in-process, too
        load_recipe(recipe)
    with pytest.raises(ConfigError, match="an endless structure"):
        load_recipe(write(tmp_path, BASE + "deepspeed:\n  overrides: &x\n    zero_optimization: *x\n"))
    with pytest.raises(ConfigError, match="override 'deepspeed.overrides=.*alias bomb"):
        load_recipe(write(tmp_path, BASE), ["deepspeed.overrides=" + "{" + billion_laughs().split("overrides:\n")[1]
                                            .strip().replace("\n    ", ", ") + "}"])


# --------------------------------------------------------------------------- deepspeed.overrides
@pytest.mark.parametrize("override,message", [
    ("deepspeed.overrides.scheduler.type=WarmupLR", "deepspeed.overrides.scheduler.type: refused: the recipe sets the "
                                                    "schedule"),
    ("deepspeed.overrides.scheduler.params.warmup_num_steps=10", "set optim.lr and optim.warmup_ratio"),
    ("deepspeed.overrides.optimizer.params.weight_decy=0.1",
     "deepspeed.overrides.optimizer.params.weight_decy: not an argument of AdamW; did you mean "
     "'optimizer.params.weight_decay'?"),
    ("deepspeed.overrides.optimizer.type=Adamm", "deepspeed.overrides.optimizer.type: 'Adamm' is not an optimizer; "
                                                 "did you mean 'Adam'?"),
    ("deepspeed.overrides.optimizer.params.max_grad_norm=1.0", "set optim.grad_clip in the recipe instead"),
    ("deepspeed.overrides.zero_optimization.stage=9", "deepspeed.overrides.zero_optimization.stage: Input should be"),
    ("deepspeed.overrides.zero_optimization.reduce_bucket_sise=3",
     "deepspeed.overrides.zero_optimization.reduce_bucket_sise: Extra inputs are not permitted"),
    ("deepspeed.overrides.zero_optimization.offload_optimizer.device=gpu",
     "deepspeed.overrides.zero_optimization.offload_optimizer.device: Input should be 'none', 'cpu' or 'nvme'"),
    ("deepspeed.overrides.bf16.enabled=maybe", "deepspeed.overrides.bf16.enabled: Input should be a valid boolean"),
    ("deepspeed.overrides.gradient_clipping=x", "deepspeed.overrides.gradient_clipping: expected a number, got str"),
])
def test_deepspeed_override_mistakes_are_one_line_at_load(tmp_path, override, message):
    with pytest.raises(ConfigError) as info:
        load_recipe(write(tmp_path, BASE), [override])
    one_line_error(info, message)


def test_a_deepspeed_config_file_with_a_scheduler_is_refused_and_good_overrides_load(tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
                                                  "scheduler": {"type": "WarmupLR"}}))
    with pytest.raises(ConfigError, match=r"ds.json: key 'scheduler' refused: the recipe sets the schedule"):
        load_recipe(write(tmp_path, BASE + "deepspeed:\n  config: ds.json\n"))
    r = load_recipe(write(tmp_path, BASE), ["deepspeed.overrides.zero_optimization.stage=2",
                                            "deepspeed.overrides.optimizer.params.foreach=true",
                                            "deepspeed.overrides.gradient_clipping=0.5"])
    assert r.deepspeed.overrides["zero_optimization"] == {"stage": 2}


# --------------------------------------------------------------------------- sequence length
def _model_folder(folder: Path, **config) -> str:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**TEACHER, **config}))
    return str(folder)


def test_a_sequence_longer_than_a_models_positions_is_refused_at_load(tmp_path):
    recipe = write(tmp_path, BASE)
    with pytest.raises(ConfigError) as info:  # the corpus stages read data.max_seq_len: `distill` checks it first
        load_recipe(recipe, ["data.max_seq_len=256"]).for_stage("general")
    one_line_error(info, "data.max_seq_len (256) is longer than the 128 positions of teacher.config's model",
                   "set data.max_seq_len to at most 128")
    load_recipe(recipe, ["data.max_seq_len=256"]).for_stage("task_specific")  # the task stages do not
    with pytest.raises(ConfigError, match=r"task.max_seq_len \(512\) is longer than the 128 positions"):
        load_recipe(recipe, ["task.name=sentiment", "task.max_seq_len=512"])
    with pytest.raises(ConfigError, match=r"data.max_seq_len \(200\) is longer"):
        load_recipe(recipe, ["stages.general.data.max_seq_len=200"])
    short = _model_folder(tmp_path / "short", max_position_embeddings=40)
    with pytest.raises(ConfigError, match=r"data.max_seq_len \(64\) is longer than the 40 positions of teacher.path"):
        load_recipe(recipe, ["teacher.config=null", f"teacher.path={short}",
                             "data.max_seq_len=64"]).for_stage("general")
    with pytest.raises(ConfigError, match=r"data.max_seq_len \(64\) is longer than the 40 positions of student.path"):
        load_recipe(recipe, [f"student.path={short}", "data.max_seq_len=64"]).for_stage("general_enhanced")
    roberta = _model_folder(tmp_path / "roberta", model_type="roberta", max_position_embeddings=66, pad_token_id=1)
    with pytest.raises(ConfigError, match=r"longer than the 64 positions of teacher.path"):  # positions start at 2
        load_recipe(recipe, ["teacher.config=null", f"teacher.path={roberta}", "task.name=pair", "task.max_seq_len=65"])
    assert load_recipe(recipe, ["task.max_seq_len=512"]).task.max_seq_len == 512  # no task: never used


# --------------------------------------------------------------------------- paths
def test_every_path_in_a_recipe_file_is_relative_to_the_recipe_whether_it_exists_or_not(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    (folder / "models/teacher").mkdir(parents=True)
    (folder / "fast_ds.json").write_text("{}")
    cwd = tmp_path / "elsewhere"
    (cwd / "data").mkdir(parents=True)
    (cwd / "data/train.tsv").write_text("x\n")  # in the current folder only: must not change the meaning
    monkeypatch.chdir(cwd)
    recipe = write(folder, BASE + "task:\n  train_file: data/train.tsv\n  dev_file: data/dev.tsv\n"
                                  "student:\n  path: models/teacher\n"
                                  "augment:\n  mlm_model: someone/mlm\n"
                                  "deepspeed:\n  config: fast_ds.json\n"
                                  "stages:\n  general:\n    data:\n      corpus: corpus/*.txt\n")
    r = load_recipe(recipe)
    anchored = folder.resolve()
    assert r.output_dir == str(anchored / "out")
    assert r.task.train_file == str(anchored / "data/train.tsv")
    assert r.task.dev_file == str(anchored / "data/dev.tsv")
    assert r.student.path == str(anchored / "models/teacher")
    assert r.augment.mlm_model == "someone/mlm"  # a Hub ID: no such folder beside the recipe
    assert r.deepspeed.config == str(anchored / "fast_ds.json")
    assert r.for_stage("general").data.corpus == str(anchored / "corpus/*.txt")
    # the command line is relative to the current folder; a bundled recipe by name has no folder of the user's
    assert load_recipe(recipe, ["output_dir=runs/x"]).output_dir == "runs/x"
    assert load_recipe("demo", [f"teacher.path={tmp_path}"]).output_dir == "runs/demo"
    assert load_recipe(write(folder, BASE + "deepspeed:\n  config: zero2\n")).deepspeed.config == "zero2"


@pytest.mark.parametrize("key", ["teacher.path", "output_dir", "task.train_file", "data.tokenizer"])
def test_an_empty_path_names_its_key(tmp_path, key):
    with pytest.raises(ConfigError) as info:
        load_recipe(write(tmp_path, BASE), [f"{key}="])
    one_line_error(info, f"{key} is empty: give a path")


# --------------------------------------------------------------------------- task files
def _task(tmp_path, train: str, dev: str, suffix: str) -> TaskConfig:
    (tmp_path / f"train{suffix}").write_text(train)
    (tmp_path / f"dev{suffix}").write_text(dev)
    return TaskConfig(train_file=str(tmp_path / f"train{suffix}"), dev_file=str(tmp_path / f"dev{suffix}"),
                      text_columns=["text"])


@pytest.mark.parametrize("split", ["train", "dev"])
def test_a_null_label_in_a_jsonl_task_file_names_file_and_line(tmp_path, split):
    from ernie_tiny_ds.data.tasks import load_task
    good = "".join(json.dumps({"text": f"t{i}", "label": i % 2}) + "\n" for i in range(4))
    bad = good + json.dumps({"text": "t", "label": None}) + "\n"
    cfg = _task(tmp_path, bad if split == "train" else good, bad if split == "dev" else good, ".jsonl")
    with pytest.raises(DataError) as info:
        load_task(cfg)
    one_line_error(info, f"{tmp_path / (split + '.jsonl')}:5: the label ('label') is null")


def test_an_unclosed_csv_quote_is_named_at_the_row_that_opens_it(tmp_path):
    from ernie_tiny_ds.data.tasks import load_task
    train = 'text,label\ngood one,1\n"never closed,0\nfine,1\nalso fine,0\nlast,1\n'
    cfg = _task(tmp_path, train, "text,label\na,1\n", ".csv")
    with pytest.raises(DataError) as info:
        load_task(cfg)
    one_line_error(info, f"{tmp_path / 'train.csv'}:3: ", "runs on to line 6", "quote opened on line 3")
    # a quoted field that spans lines is fine, and its row is named by its first line
    cfg = _task(tmp_path, 'text,label\n"two\nlines",0\nb,1\n', "text,label\na,1\n", ".csv")
    assert [e.source.rsplit(":", 1)[1] for e in load_task(cfg).train] == ["2", "4"]


# --------------------------------------------------------------------------- models and the Hub
def test_a_teacher_folder_without_a_tokenizer_points_to_data_tokenizer(tmp_path):
    from ernie_tiny_ds.data.tokenizer import recipe_tokenizer_path
    teacher = _model_folder(tmp_path / "teacher")
    r = load_recipe(write(tmp_path, BASE), ["teacher.config=null", f"teacher.path={teacher}"])
    with pytest.raises(ConfigError) as info:
        recipe_tokenizer_path(r)
    one_line_error(info, f"teacher.path: {teacher} has no tokenizer", "set data.tokenizer")


def test_push_to_an_endpoint_that_refuses_the_connection_is_one_line(tmp_path, tokenizer_dir, vocab_size,
                                                                      monkeypatch):
    import socket

    from test_model_card import export_student

    from ernie_tiny_ds.workflows.push import push
    folder = export_student(tmp_path / "student", tokenizer_dir, vocab_size, head=True)
    with socket.socket() as s:  # a port nobody listens on once this socket closes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read once, at its import
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    with pytest.raises(UserError) as info:
        push(folder, "me/tiny-student", endpoint=f"http://127.0.0.1:{port}")
    one_line_error(info, f"push to me/tiny-student failed: cannot reach http://127.0.0.1:{port}")


# --------------------------------------------------------------------------- Ctrl-C
@pytest.mark.slow
def test_ctrl_c_during_training_and_saves_is_one_line_and_exit_130(tmp_path, tokenizer_dir, vocab_size):
    recipe = tiny_recipe(tmp_path, tokenizer_dir, vocab_size, train={"max_steps": 100000, "save_every": 1})
    # Ctrl-C in a terminal: SIGINT at its default action in the command, even where this test's own
    # process ignores it (a pytest-xdist worker does, and a child inherits an ignored signal)
    proc = subprocess.Popen([sys.executable, "-m", "ernie_tiny_ds.cli", "distill", "--config", str(recipe)],
                            env=env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    checkpoints = tmp_path / "out/general/checkpoints"
    try:
        deadline = time.monotonic() + 240
        while not (checkpoints / "latest").is_file() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        while not list(checkpoints.glob("*.partial")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.005)  # a save under way (saves run every step): the interrupt lands in or near it
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if "interrupted" in line or "Traceback" in line]
    assert len(lines) == 1 and lines[0].startswith("interrupted (Ctrl-C); the newest checkpoint is "), stderr[-3000:]
    named = Path(lines[0].split("the newest checkpoint is ")[1].split(":")[0])
    assert named.parent == checkpoints and (checkpoints / "latest").read_text().strip() == named.name
    assert "running the same command again resumes from it" in lines[0]
    assert "KeyboardInterrupt" not in stderr

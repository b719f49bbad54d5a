"""Hub IDs wherever a model path is accepted, resolved offline from a Hub cache this test lays out
itself (HF_HOME=tmp: hub/models--ORG--NAME/{blobs,snapshots/<commit>,refs/main}), as
`huggingface-cli download` would have left it."""
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import transformers
from distributed import run_cli, tiny_recipe, tiny_teacher

from ernie_tiny_ds.config import load_recipe
from ernie_tiny_ds.data.hub import looks_like_hub_id, resolve
from ernie_tiny_ds.data.tokenizer import load_tokenizer, recipe_tokenizer_path
from ernie_tiny_ds.distill.models import build_student, load_teacher
from ernie_tiny_ds.errors import ConfigError


def put_in_hub_cache(hf_home: Path, repo_id: str, folder: Path, commit: str, ref: str = "main") -> Path:
    """Files of `folder` as blobs (named by their hash) with a snapshot of symlinks and refs/<ref>."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo / "blobs" / digest)
        (snapshot / f.name).symlink_to(Path("../../blobs") / digest)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch, tokenizer_dir, vocab_size):
    """A cache holding org/tiny-bert (teacher + tokenizer) and org/tiny-student at tag v1."""
    hf_home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers.set_seed(0)
    teacher_dir = tmp_path / "teacher_src"
    values = tiny_teacher(vocab_size)
    values.pop("model_type")
    transformers.BertModel(transformers.BertConfig(**values)).save_pretrained(teacher_dir)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(teacher_dir)
    student_dir = tmp_path / "student_src"
    transformers.BertModel(transformers.BertConfig(**{**values, "num_hidden_layers": 2, "hidden_size": 32,
                                                      "intermediate_size": 64})).save_pretrained(student_dir)
    teacher = put_in_hub_cache(hf_home, "org/tiny-bert", teacher_dir, "a" * 40)
    student = put_in_hub_cache(hf_home, "org/tiny-student", student_dir, "b" * 40, ref="v1")
    return {"home": hf_home, "teacher": teacher, "student": student}


def test_what_counts_as_a_hub_id():
    for value in ("bert-base-uncased", "nghuyong/ernie-3.0-base-zh", "google/bert_uncased_L-2_H-128_A-2"):
        assert looks_like_hub_id(value), value
    for value in ("/models/bert", "./bert", "~/bert", "a/b/c", "recipe.yaml", "org/model.bin", "a--b", "../x", ""):
        assert not looks_like_hub_id(value), value


def test_a_folder_stays_a_folder_and_a_hub_id_becomes_its_snapshot(hub, tmp_path):
    assert resolve(str(tmp_path), "teacher.path") == str(tmp_path)
    assert Path(resolve("org/tiny-bert", "teacher.path")) == hub["teacher"]
    assert Path(resolve("org/tiny-bert", "teacher.path", revision="a" * 40)) == hub["teacher"]
    assert Path(resolve("org/tiny-student", "student.path", revision="v1")) == hub["student"]
    with pytest.raises(ConfigError, match="teacher.path: folder not found: /no/such/folder"):
        resolve("/no/such/folder", "teacher.path")


def test_offline_without_a_cached_copy_says_how_to_download(hub):
    with pytest.raises(ConfigError) as err:
        resolve("bert-base-uncased", "teacher.path")
    text = str(err.value)
    assert "\n" not in text
    assert "teacher.path: Hub model bert-base-uncased is not in the Hugging Face cache" in text
    assert str(hub["home"] / "hub") in text
    assert "`huggingface-cli download bert-base-uncased`" in text and "HF_HUB_OFFLINE=0" in text
    with pytest.raises(ConfigError, match="org/tiny-student@v2 is not in the Hugging Face cache"):
        resolve("org/tiny-student", "student.path", revision="v2")


def test_recipe_keys_take_hub_ids(hub, tmp_path, vocab_size):
    recipe = load_recipe(None, ["teacher.path=org/tiny-bert", "student.path=org/tiny-student",
                                "student.revision=v1", f"output_dir={tmp_path / 'out'}"])
    assert Path(recipe_tokenizer_path(recipe)) == hub["teacher"]  # the teacher's own tokenizer
    tokenizer = load_tokenizer("org/tiny-bert")
    assert len(tokenizer) == vocab_size
    teacher = load_teacher(recipe.teacher, finetuned=False, seed=0)
    assert Path(teacher.config._name_or_path) == hub["teacher"]
    student = build_student(recipe.student, teacher.config, seed=0)
    assert student.config.num_hidden_layers == 2 and Path(student.config._name_or_path) == hub["student"]
    bad = load_recipe(None, ["teacher.path=org/tiny-bert", "data.tokenizer=org/no-such-tokenizer"])
    with pytest.raises(ConfigError, match="data.tokenizer: Hub model org/no-such-tokenizer is not in the"):
        recipe_tokenizer_path(bad)


@pytest.mark.slow
def test_distill_resolves_hub_ids_offline(hub, tmp_path, tokenizer_dir, vocab_size):
    recipe = tiny_recipe(tmp_path, tokenizer_dir, vocab_size, train={"max_steps": 2, "save_every": 2})
    args = ["distill", "--config", str(recipe), "--stage", "general", "teacher.config=null",
            "teacher.path=org/tiny-bert", "data.tokenizer=org/tiny-bert", "student.path=org/tiny-student",
            "student.revision=v1"]
    proc = run_cli(args, timeout=300, extra_env={"HF_HOME": str(hub["home"]), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    done = json.loads((tmp_path / "out" / "general" / "stage_done.json").read_text())
    assert done["steps"] == 2 and done["teacher"] == "org/tiny-bert" and done["student_init"] == "org/tiny-student"

    # the same recipe asking for a model that is not cached: one line, exit 2
    proc = run_cli(args[:-3] + ["teacher.path=nghuyong/ernie-3.0-base-zh", f"output_dir={tmp_path / 'out2'}"],
                   extra_env={"HF_HOME": str(hub["home"]), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "nghuyong/ernie-3.0-base-zh" in lines[0] and "huggingface-cli download" in lines[0]

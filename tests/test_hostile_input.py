"""Hostile input (issue 13 items 9-16): every bad value or file is one line naming the key, file or
line, exit code 2, never a traceback and never silently accepted."""
import gzip
import json
import re

import pytest
import yaml
from distributed import tiny_recipe

from ernie_tiny_ds.config import TaskConfig, load_recipe
from ernie_tiny_ds.errors import ConfigError, DataError, UserError


def one_line_exit_2(result) -> list[str]:
    """The `error:` lines of an in-process command that must exit 2 with exactly one (an uncaught
    exception, the traceback case, fails the test by itself)."""
    code, lines = result
    assert code == 2, lines
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and not any("Traceback" in line for line in lines), lines
    return errors


def _recipe(tmp_path, tokenizer_dir, vocab_size, **sections):
    return str(tiny_recipe(tmp_path, tokenizer_dir, vocab_size, **sections))


# --------------------------------------------------------------------------- 9, 10: non-finite floats
NON_FINITE = {
    "optim.lr=.nan": "optim.lr",
    "losses.weights.hidden=nan": "losses.weights.hidden",
    "losses.temperature=.inf": "losses.temperature",
    "finetune.epochs=nan": "finetune.epochs",
    "finetune.lr=-.inf": "finetune.lr",
    "optim.betas=[0.9, .nan]": r"optim.betas\[1\]",
    "optim.warmup_ratio=.nan": "optim.warmup_ratio",
    "finetune.warmup_ratio=.nan": "finetune.warmup_ratio",
    "finetune.weight_decay=inf": "finetune.weight_decay",
    "stages.general.optim.lr=.nan": "optim.lr",
    "optim.grad_clip=1e999": "optim.grad_clip",
}


@pytest.mark.parametrize("override", sorted(NON_FINITE))
def test_every_float_key_must_be_finite(tmp_path, tokenizer_dir, vocab_size, override):
    with pytest.raises(ConfigError, match=NON_FINITE[override]):
        load_recipe(_recipe(tmp_path, tokenizer_dir, vocab_size), [override])


def test_finetune_range_keys_are_checked(tmp_path, tokenizer_dir, vocab_size):
    path = _recipe(tmp_path, tokenizer_dir, vocab_size)
    for bad, key in (("finetune.warmup_ratio=1.5", "finetune.warmup_ratio"),
                     ("finetune.weight_decay=-1", "finetune.weight_decay")):
        with pytest.raises(ConfigError, match=key):
            load_recipe(path, [bad])


def test_non_negative_and_positive_keys(tmp_path, tokenizer_dir, vocab_size):
    path = _recipe(tmp_path, tokenizer_dir, vocab_size)
    load_recipe(path, ["losses.weights.hidden=0", "optim.grad_clip=0", "optim.weight_decay=0"])  # 0 allowed
    with pytest.raises(ConfigError, match=r"losses.weights.hidden must be >= 0"):
        load_recipe(path, ["losses.weights.hidden=-0.5"])
    with pytest.raises(ConfigError, match=r"losses.temperature must be > 0"):
        load_recipe(path, ["losses.temperature=0"])


def test_nan_epochs_on_the_command_line_is_one_line(tmp_path, tokenizer_dir, vocab_size, in_process):
    recipe = _recipe(tmp_path, tokenizer_dir, vocab_size, task={"name": "sentiment", "max_seq_len": 32})
    errors = one_line_exit_2(in_process(["finetune-teacher", "--config", str(recipe), "finetune.epochs=nan"]))
    assert "finetune.epochs" in errors[0], errors


# --------------------------------------------------------------------------- 11: label text
def _labels_task(tmp_path, name, text, **extra):
    path = tmp_path / name
    path.write_text(text)
    return TaskConfig(train_file=str(path), text_columns=["s"], **extra)


def test_labels_equal_as_numbers_or_up_to_whitespace_are_one_class(tmp_path):
    from ernie_tiny_ds.data.tasks import load_task
    task = load_task(_labels_task(tmp_path, "t.tsv", "s\tlabel\na\t1\nb\t1.0\nc\t1 \nd\t0\ne\t 0.00\nf\t+1e0\n"))
    assert task.label_names == ["0", "1"]
    assert [e.label for e in task.train] == [1, 1, 1, 0, 0, 1]
    task = load_task(_labels_task(tmp_path, "t.jsonl", '{"s": "a", "label": 1.0}\n{"s": "b", "label": "1 "}\n'
                                                       '{"s": "c", "label": 2.5}\n{"s": "d", "label": "2.50"}\n'))
    assert task.label_names == ["1", "2.5"] and [e.label for e in task.train] == [0, 0, 1, 1]
    task = load_task(_labels_task(tmp_path, "w.tsv", "s\tlabel\na\tpos \nb\tneg\nc\t pos\n"))
    assert task.label_names == ["neg", "pos"] and [e.label for e in task.train] == [1, 0, 1]
    # configured names are normalised the same way, and must not collide once normalised
    task = load_task(_labels_task(tmp_path, "t.tsv", "s\tlabel\na\t1\nb\t0.0\n", labels=["1.0", "0"]))
    assert task.label_names == ["1", "0"] and [e.label for e in task.train] == [0, 1]
    with pytest.raises(ConfigError, match="task.labels: names repeat"):
        load_task(_labels_task(tmp_path, "t.tsv", "s\tlabel\na\t1\nb\t0\n", labels=["1", "1.0"]))


def test_an_empty_label_names_file_and_line(tmp_path):
    from ernie_tiny_ds.data.tasks import load_task
    cfg = _labels_task(tmp_path, "t.tsv", "s\tlabel\na\t1\nb\t \nc\t0\n")
    with pytest.raises(DataError, match=r"t.tsv:3: the label is empty"):
        load_task(cfg)


def test_huge_exponent_labels_stay_cheap(tmp_path):
    from ernie_tiny_ds.data.tasks import load_task
    task = load_task(_labels_task(tmp_path, "t.tsv", "s\tlabel\na\t1e999999999\nb\t0\n"))
    assert len(task.label_names) == 2 and max(len(n) for n in task.label_names) < 20


# --------------------------------------------------------------------------- 12: tokenizer vs teacher
def _tokenizer_variant(src, dst, change):
    import shutil
    shutil.copytree(src, dst)
    spec = json.loads((dst / "tokenizer.json").read_text())
    change(spec)
    (dst / "tokenizer.json").write_text(json.dumps(spec))
    return str(dst)


def _teacher_folder(tmp_path, tokenizer_dir, vocab_size):
    import shutil

    from transformers import BertConfig
    folder = tmp_path / "teacher"
    shutil.copytree(tokenizer_dir, folder)
    BertConfig(vocab_size=vocab_size + 64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64).save_pretrained(folder)
    return folder


def test_tokenizer_must_share_the_teachers_vocabulary_and_casing(tmp_path, tokenizer_dir, vocab_size):
    from transformers import AutoConfig

    from ernie_tiny_ds.data.tokenizer import check_vocab_matches, load_tokenizer
    teacher = AutoConfig.from_pretrained(_teacher_folder(tmp_path, tokenizer_dir, vocab_size))
    check_vocab_matches(load_tokenizer(tokenizer_dir), teacher, tokenizer_dir)  # the same vocabulary: fine

    def swap(spec):  # same size, two tokens trade ids (a different vocabulary file)
        vocab = spec["model"]["vocab"]
        a, b = "river", "the"
        vocab[a], vocab[b] = vocab[b], vocab[a]
    swapped = _tokenizer_variant(tokenizer_dir, tmp_path / "swapped", swap)
    with pytest.raises(ConfigError, match=r"does not share the teacher's vocabulary .*2 of its \d+ tokens differ"):
        check_vocab_matches(load_tokenizer(swapped), teacher, swapped)

    cased = _tokenizer_variant(tokenizer_dir, tmp_path / "cased",
                               lambda spec: spec["normalizer"].update(lowercase=False))
    settings = json.loads((tmp_path / "cased/tokenizer_config.json").read_text())
    (tmp_path / "cased/tokenizer_config.json").write_text(json.dumps({**settings, "do_lower_case": False}))
    assert load_tokenizer(cased)("River")["input_ids"] != load_tokenizer(tokenizer_dir)("River")["input_ids"]
    with pytest.raises(ConfigError, match=r"keeps the case of its input but the teacher's .* lower-cases"):
        check_vocab_matches(load_tokenizer(cased), teacher, cased)
    assert check_vocab_matches(load_tokenizer(cased), vocab_size, cased) is None  # a bare size: size only


# --------------------------------------------------------------------------- 13, 14: corpus files
def _lines_text(n: int = 3000) -> bytes:
    import random
    rng = random.Random(n)  # varied words: the file stays large once compressed
    words = "the old river town market bridge school garden north south winter summer stone road".split()
    return "".join(f"document {i} " + " ".join(rng.choice(words) for _ in range(12)) + ".\n"
                   for i in range(n)).encode()


def _compress(kind: str, data: bytes) -> bytes:
    if kind == "gzip":
        return gzip.compress(data)
    import zstandard
    return zstandard.ZstdCompressor().compress(data)


def _read_all(path):
    from types import SimpleNamespace

    from ernie_tiny_ds.data.sources import ReadStats, check_files, read_records
    cfg = SimpleNamespace(format="auto", text_field="text", document_separator="line", on_binary_file="error")
    stats = ReadStats()
    return [r.text for f in check_files([str(path)], cfg, stats) for r in read_records(f, 0, cfg, stats)]


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_a_compressed_file_cut_after_its_first_8k_is_named_at_the_line(tmp_path, kind):
    data = _compress(kind, _lines_text(20000))  # zstd blocks hold 128 KiB: cut after several of them
    assert len(data) > 3 * 8192
    path = tmp_path / f"part.txt.{'gz' if kind == 'gzip' else 'zst'}"
    path.write_bytes(data[: len(data) // 2])  # the 8 KiB sniff up front decompresses fine
    with pytest.raises(DataError, match=rf"cannot decompress .*{path.name} at line \d+: .*truncated"):
        _read_all(path)


@pytest.mark.parametrize("kind", ["plain", "gzip", "zstd"])
def test_nul_bytes_past_the_first_8k_are_named_at_the_line(tmp_path, kind):
    data = _lines_text() + b"a line with a \x00 byte\n" + _lines_text(10)
    path = tmp_path / ("part.txt" if kind == "plain" else f"part.txt.{'gz' if kind == 'gzip' else 'zst'}")
    path.write_bytes(data if kind == "plain" else _compress(kind, data))
    with pytest.raises(DataError, match=rf"{path.name}: line 3001 holds NUL bytes"):
        _read_all(path)
    jsonl = tmp_path / "part.jsonl"
    jsonl.write_bytes(b'{"text": "fine"}\n' * 1000 + b'{"text": "bad \x00"}\n')
    with pytest.raises(DataError, match=r"part.jsonl: line 1001 holds NUL bytes"):
        _read_all(jsonl)


def test_every_zstd_frame_is_read(tmp_path):
    path = tmp_path / "two_frames.txt.zst"
    path.write_bytes(_compress("zstd", _lines_text(100)) + _compress("zstd", _lines_text(50)))
    assert len(_read_all(path)) == 150


def test_hidden_files_and_folders_in_a_corpus_folder_are_skipped(tmp_path):
    from ernie_tiny_ds.data.sources import resolve_files
    corpus = tmp_path / "corpus"
    (corpus / ".git" / "objects").mkdir(parents=True)
    (corpus / ".git" / "objects" / "pack.txt").write_text("not corpus\n")
    (corpus / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (corpus / "sub" / ".cache").mkdir(parents=True)
    (corpus / "sub" / ".cache" / "x.txt").write_text("not corpus\n")
    (corpus / "sub" / "b.txt").write_text("text\n")
    (corpus / "a.txt").write_text("text\n")
    (corpus / ".hidden.txt").write_text("not corpus\n")
    assert resolve_files(str(corpus)) == [str(corpus / "a.txt"), str(corpus / "sub" / "b.txt")]


# --------------------------------------------------------------------------- 16: resume with more ranks
@pytest.mark.slow
def test_resuming_with_more_ranks_than_the_checkpoint_is_one_line(stopped_run):
    from distributed import run_ranks
    recipe = stopped_run  # stage 1 stopped at step 2 by one process: step_00000002 holds one rank's state
    proc = run_ranks(["distill", "--config", str(recipe), "--stage", "general"], check=False, runner="deepspeed")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    errors = {line.split("error: ", 1)[1] for line in out.splitlines() if "error: " in line}
    assert errors and all(re.search(r"step_00000002 was written by 1 rank\(s\); this run has 2", e)
                          for e in errors), out[-3000:]
    assert "Traceback" not in out


# --------------------------------------------------------------------------- 15: damaged model folders
def _saved_bert(folder, vocab_size):
    from transformers import BertConfig, BertModel
    BertModel(BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    return folder


def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep(len(data))])


@pytest.mark.parametrize("keep", [lambda n: n // 2, lambda n: 5], ids=["half", "5 bytes"])
def test_a_truncated_safetensors_in_teacher_or_student_path_is_one_line(tmp_path, vocab_size, keep):
    from ernie_tiny_ds.config import StudentConfig, TeacherConfig
    from ernie_tiny_ds.distill.models import build_student, load_teacher
    good = load_teacher(TeacherConfig(path=str(_saved_bert(tmp_path / "good", vocab_size))), False, 0)
    bad = _saved_bert(tmp_path / "bad", vocab_size)
    _truncate(bad / "model.safetensors", keep)
    with pytest.raises(UserError, match=rf"^teacher.path: cannot load the weights in {bad}: .*truncated or damaged"):
        load_teacher(TeacherConfig(path=str(bad)), False, 0)
    with pytest.raises(UserError, match=rf"^student.path: cannot load the weights in {bad}"):
        build_student(StudentConfig(path=str(bad)), good.config, 0)
    with pytest.raises(UserError, match=rf"^student.path: cannot load the weights in {bad}"):
        build_student(StudentConfig(path=str(bad)), good.config, 0, num_labels=2)
    (bad / "config.json").write_text('{"model_type": "bert", ')
    with pytest.raises(UserError, match=rf"^teacher.path: cannot load the config.json in {bad}"):
        load_teacher(TeacherConfig(path=str(bad)), False, 0)


def test_a_truncated_teacher_on_the_command_line_is_one_line(tmp_path, tokenizer_dir, vocab_size, in_process):
    teacher = _saved_bert(tmp_path / "teacher", vocab_size)
    _truncate(teacher / "model.safetensors", lambda n: n - 100)
    recipe = tiny_recipe(tmp_path, tokenizer_dir, vocab_size)
    values = yaml.safe_load(recipe.read_text())
    values["teacher"] = {"path": str(teacher)}
    recipe.write_text(yaml.safe_dump(values))
    errors = one_line_exit_2(in_process(["distill", "--config", str(recipe), "--stage", "general"]))
    assert "teacher.path: cannot load the weights" in errors[0], errors


def test_a_cased_tokenizer_with_an_uncased_teacher_stops_the_command(tmp_path, tokenizer_dir, vocab_size,
                                                                      in_process):
    import shutil
    teacher = _saved_bert(tmp_path / "teacher", vocab_size)
    shutil.copytree(tokenizer_dir, teacher, dirs_exist_ok=True)  # the teacher ships its (uncased) tokenizer
    cased = _tokenizer_variant(tokenizer_dir, tmp_path / "cased",
                               lambda spec: spec["normalizer"].update(lowercase=False))
    settings = json.loads((tmp_path / "cased/tokenizer_config.json").read_text())
    (tmp_path / "cased/tokenizer_config.json").write_text(json.dumps({**settings, "do_lower_case": False}))
    recipe = tiny_recipe(tmp_path, tokenizer_dir, vocab_size)
    values = yaml.safe_load(recipe.read_text())
    values["teacher"] = {"path": str(teacher)}
    values["data"]["tokenizer"] = cased
    recipe.write_text(yaml.safe_dump(values))
    errors = one_line_exit_2(in_process(["distill", "--config", str(recipe), "--stage", "general"]))
    assert "keeps the case of its input but the teacher's" in errors[0], errors
    assert not (tmp_path / "out/general/checkpoints").exists()

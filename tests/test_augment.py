"""`augment`: TinyBERT-style task-data augmentation with a real (tiny, random) masked LM built here,
and task.augmented_train_file in stages 3-4 (never in teacher finetuning, dev or selection)."""
import csv
import io
import json

import pytest
import torch
import transformers

from ernie_tiny_ds.cli import parse_args
from ernie_tiny_ds.config import load_recipe
from ernie_tiny_ds.data.tasks import build_task_loader, load_task
from ernie_tiny_ds.errors import ConfigError
from ernie_tiny_ds.runtime.loop import make_loader
from ernie_tiny_ds.stages import STAGE_SPECS
from ernie_tiny_ds.workflows.augment import augment_file, is_cjk, load_mlm, word_spans

NAMES = "marco elena tara rosa olga pablo samir farid ben".split()
THINGS = "window basket clock camera garden painting bicycle".split()
PLACES = "museum school library park harbour".split()


def tiny_bert(folder, tokenizer, head: bool = True, seed: int = 0):
    """A randomly initialised 1-layer BERT (with or without its masked-LM head) and its tokenizer."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    model = transformers.BertForMaskedLM(config) if head else transformers.BertModel(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def english(tmp_path_factory, tokenizer_dir):
    folder = tmp_path_factory.mktemp("english")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    return tiny_bert(folder / "mlm", tokenizer), tiny_bert(folder / "headless", tokenizer, head=False)


def write_task(folder, suffix=".tsv", n=12):
    header = ["premise", "hypothesis", "label"]
    rows = [(f"{NAMES[i % 9].title()} bought the {THINGS[i % 7]} in the {PLACES[i % 5]}.",
             f"{NAMES[(i + 3) % 9]} never went to the {PLACES[(i + 1) % 5]}.", ["yes", "no", "maybe"][i % 3])
            for i in range(n)]
    for split, part in (("train", rows), ("dev", rows[:3])):
        path = folder / f"{split}{suffix}"
        if suffix == ".jsonl":
            path.write_text("".join(json.dumps(dict(zip(header, r))) + "\n" for r in part))
        else:
            path.write_text("".join("\t".join(r) + "\n" for r in [header, *part]))
    return rows


def recipe(tmp_path, teacher, *extra, suffix=".tsv"):
    return load_recipe(None, [f"teacher.path={teacher}", f"task.train_file={tmp_path / f'train{suffix}'}",
                              f"task.dev_file={tmp_path / f'dev{suffix}'}", "task.text_columns=[premise, hypothesis]",
                              "task.max_seq_len=32", "augment.copies=4", *extra])


def tsv_rows(path):
    return list(csv.reader(io.StringIO(path.read_text(encoding="utf-8")), delimiter="\t", quoting=csv.QUOTE_NONE))


# --------------------------------------------------------------------------- the file
def test_same_seed_same_bytes_whatever_the_batch_size_and_another_seed_differs(tmp_path, english):
    write_task(tmp_path)
    one = augment_file(recipe(tmp_path, english[0], "augment.batch_size=64"), tmp_path / "a.tsv")
    two = augment_file(recipe(tmp_path, english[0], "augment.batch_size=3"), tmp_path / "b.tsv", chunk_examples=5)
    other = augment_file(recipe(tmp_path, english[0], "augment.seed=7"), tmp_path / "c.tsv")
    assert one.read_bytes() == two.read_bytes()
    assert one.read_bytes() != other.read_bytes()
    assert not list(tmp_path.glob("*.augment-*")) and not list(tmp_path.glob(".*.tmp"))  # no leftovers


def test_originals_first_copies_labels_and_replacement_rate(tmp_path, english):
    rows = write_task(tmp_path)
    out = augment_file(recipe(tmp_path, english[0], "augment.copies=10", "augment.replace_prob=0.4"),
                       tmp_path / "aug.tsv")
    written = tsv_rows(out)
    assert written[0] == ["premise", "hypothesis", "label"]
    body = written[1:]
    assert len(body) == len(rows) * 11
    changed = total = 0
    for i, row in enumerate(rows):
        group = body[i * 11:(i + 1) * 11]
        assert tuple(group[0]) == row  # the original, unchanged, before its copies
        assert all(copy[2] == row[2] for copy in group)  # labels kept
        for copy in group[1:]:
            for original, new in zip(row[:2], copy[:2]):
                words, new_words = original.split(), new.split()
                assert len(words) == len(new_words)  # one word for one word
                changed += sum(a != b for a, b in zip(words, new_words))
                total += len(words)
                assert new.endswith(".") == original.endswith(".")  # punctuation is never replaced
    assert 0.32 < changed / total < 0.48  # replace_prob 0.4 (every word here has candidates)
    # a replaced capitalised word keeps its capital (the vocabulary is lower-case)
    assert all(copy[0][0] == copy[0][0].upper() for copy in body)


def test_a_word_split_into_pieces_is_one_unit(english):
    tokenizer = load_mlm(load_recipe(None, [f"teacher.path={english[0]}"])).tokenizer
    text = "Olga photographed the unbelievably grey harbour, twice."
    assert tokenizer.tokenize("unbelievably") != ["unbelievably"]  # several pieces ...
    assert [text[a:b] for a, b in word_spans(tokenizer, text)] == [  # ... one word
        "Olga", "photographed", "the", "unbelievably", "grey", "harbour", "twice"]


def test_jsonl_task_keeps_its_format(tmp_path, english):
    rows = write_task(tmp_path, ".jsonl", n=5)
    out = augment_file(recipe(tmp_path, english[0], suffix=".jsonl"), tmp_path / "aug.jsonl")
    objects = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(objects) == 5 * 5 and objects[0] == dict(zip(["premise", "hypothesis", "label"], rows[0]))
    with pytest.raises(ConfigError, match="format of task.train_file"):
        augment_file(recipe(tmp_path, english[0], suffix=".jsonl"), tmp_path / "aug.tsv")


# --------------------------------------------------------------------------- Chinese
CHINESE = "酒店房间非常干净前台服务热情早餐真的好我们还是觉得有点贵"


def test_chinese_is_replaced_character_by_character(tmp_path):
    folder = tmp_path / "zh_tok"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                                 *sorted(set(CHINESE + "。，"))]) + "\n", encoding="utf-8")
    tokenizer = transformers.BertTokenizerFast(vocab=str(folder / "vocab.txt"), tokenize_chinese_chars=True,
                                               do_lower_case=False)
    teacher = tiny_bert(tmp_path / "zh_mlm", tokenizer)
    texts = ["酒店房间非常干净，早餐真的好。", "我们还是觉得有点贵。", "前台服务热情。", "房间干净，服务好。"]
    (tmp_path / "train.tsv").write_text("label\ttext_a\n" + "".join(f"{i % 2}\t{t}\n" for i, t in enumerate(texts)))
    r = load_recipe(None, [f"teacher.path={teacher}", f"task.train_file={tmp_path / 'train.tsv'}",
                           "task.text_columns=[text_a]", "task.max_seq_len=32", "augment.copies=6",
                           "release.language=[zh]"])
    body = tsv_rows(augment_file(r, tmp_path / "aug.tsv"))[1:]
    replaced = 0
    for i, text in enumerate(texts):
        for label, copy in body[i * 7 + 1:(i + 1) * 7]:
            assert label == str(i % 2) and len(copy) == len(text)  # one character for one character
            for old, new in zip(text, copy):
                if old != new:
                    assert is_cjk(old) and is_cjk(new)  # a replaced span is exactly one CJK character
                    replaced += 1
    assert replaced > 0


# --------------------------------------------------------------------------- resume
def test_a_killed_run_resumes_to_the_same_file(tmp_path, english, capsys):
    write_task(tmp_path, n=13)
    whole = augment_file(recipe(tmp_path, english[0]), tmp_path / "whole.tsv", chunk_examples=4)

    def kill(done):
        if done == 2:
            raise KeyboardInterrupt

    out = tmp_path / "resumed.tsv"
    with pytest.raises(KeyboardInterrupt):
        augment_file(recipe(tmp_path, english[0]), out, chunk_examples=4, after_chunk=kill)
    assert not out.exists() and (tmp_path / "resumed.tsv.augment-state.json").is_file()  # no half file
    capsys.readouterr()
    augment_file(recipe(tmp_path, english[0], "augment.batch_size=5"), out, chunk_examples=4)
    assert "resuming after 2 finished chunk(s)" in capsys.readouterr().out
    assert out.read_bytes() == whole.read_bytes()
    assert not (tmp_path / "resumed.tsv.augment-state.json").exists()


# --------------------------------------------------------------------------- the masked LM
def test_no_mlm_head_and_no_mlm_model_is_a_clear_error(tmp_path, english):
    write_task(tmp_path, n=3)
    with pytest.raises(ConfigError, match=r"augment\.mlm_model: not set, and teacher\.path .* no trained masked-LM"):
        augment_file(recipe(tmp_path, english[1]), tmp_path / "aug.tsv")
    assert not (tmp_path / "aug.tsv").exists()
    out = augment_file(recipe(tmp_path, english[1], f"augment.mlm_model={english[0]}"), tmp_path / "aug.tsv")
    assert len(tsv_rows(out)) == 1 + 3 * 5
    with pytest.raises(ConfigError, match=r"augment\.mlm_model: .* has no trained masked-LM head"):
        augment_file(recipe(tmp_path, english[1], f"augment.mlm_model={english[1]}"), tmp_path / "x.tsv")


def test_cli_takes_the_recipe_and_overrides_like_the_other_commands(tmp_path, english):
    write_task(tmp_path, n=3)
    config = tmp_path / "recipe.yaml"
    config.write_text(f"teacher: {{path: {english[0]}}}\ntask: {{train_file: train.tsv, "
                      f"text_columns: [premise, hypothesis], max_seq_len: 32}}\n")
    args = parse_args(["augment", "--config", str(config), "--output", str(tmp_path / "o.tsv"), "augment.copies=2"])
    assert args.func(args) == 0
    assert len(tsv_rows(tmp_path / "o.tsv")) == 1 + 3 * 3


@pytest.mark.parametrize("override, message", [
    ("augment.replace_prob=1.5", r"augment\.replace_prob must be in \(0, 1\]"),
    ("augment.copies=0", "augment.copies must be > 0"),
    ("augment.top_k=-1", "augment.top_k must be > 0"),
    ("augment.copy=3", "did you mean 'augment.copies'"),
])
def test_bad_augment_keys(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(None, ["teacher.config={}", override])


# --------------------------------------------------------------------------- stages 3-4
def test_task_stages_train_on_the_augmented_file_and_finetuning_does_not(tmp_path, english):
    rows = write_task(tmp_path, n=10)
    extra = ["task.selection_split=0.2", "train.micro_batch_size=2"]
    out = augment_file(recipe(tmp_path, english[0], *extra), tmp_path / "aug.tsv")
    plain = load_task(recipe(tmp_path, english[0], *extra).task)
    assert len(tsv_rows(out)) == 1 + len(plain.train) * 5  # the held-out selection examples are not augmented
    r = recipe(tmp_path, english[0], *extra, f"task.augmented_train_file={out}")
    tokenizer = load_mlm(r).tokenizer
    for stage in ("task_adaptive", "task_specific"):
        loader = make_loader(r.for_stage(stage), STAGE_SPECS[stage], tokenizer, 0, 1)
        assert len(loader.task.train) == len(plain.train) * 5
        assert all(e.source.startswith(f"{out}:") for e in loader.task.train)
        assert [e.texts for e in loader.task.selection] == [e.texts for e in plain.selection]  # selection: original
        assert loader.task.dev == plain.dev
    # teacher finetuning (and selection, report, evaluate) read the task without `augmented`
    finetune = build_task_loader(r.task, tokenizer, 2, 0, 1, 0, with_labels=True)
    assert [e.texts for e in finetune.task.train] == [e.texts for e in plain.train]
    assert all(e.source.startswith(str(tmp_path / "train.tsv")) for e in finetune.task.train)
    assert len(rows) == len(plain.train) + len(plain.selection)
    missing = recipe(tmp_path, english[0], f"task.augmented_train_file={tmp_path / 'gone.tsv'}")
    with pytest.raises(ConfigError, match=r"task\.augmented_train_file: file not found: .*gone\.tsv"):
        load_task(missing.task, augmented=True)

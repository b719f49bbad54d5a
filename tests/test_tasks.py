"""Task data: file formats, label mapping, bad-input messages, rank shards and exact resume."""
import io
import json
import random
import types

import numpy as np
import pytest
import torch

from ernie_tiny_ds.config import TaskConfig
from ernie_tiny_ds.data.tasks import TaskLoader, encode_batch, iter_dev_batches, load_task, token_lengths
from ernie_tiny_ds.errors import ConfigError, DataError

PAIRS = [("a man eats bread.", "a person eats.", "entailment"),
         ("the city, old and green.", "nobody lives there.", "contradiction"),
         ("ships open the harbor.", "the harbor is north.", "neutral")]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from ernie_tiny_ds.data.tokenizer import load_tokenizer
    return load_tokenizer(tokenizer_dir)


def write_rows(path, header, rows):
    """Write rows as .tsv, .csv or .jsonl according to the suffix."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(dict(zip(header, r))) + "\n" for r in rows))
    else:
        import csv
        out = io.StringIO()
        writer = csv.writer(out, delimiter="\t" if path.suffix == ".tsv" else ",", lineterminator="\n",
                            quoting=csv.QUOTE_NONE if path.suffix == ".tsv" else csv.QUOTE_MINIMAL)
        writer.writerow(header)
        writer.writerows(rows)
        path.write_text(out.getvalue())
    return str(path)


def pair_task(tmp_path, suffix=".tsv", **extra):
    train = write_rows(tmp_path / f"train{suffix}", ["premise", "hypothesis", "label"], PAIRS * 2)
    dev = write_rows(tmp_path / f"dev{suffix}", ["premise", "hypothesis", "label"], PAIRS[::-1])
    return TaskConfig(name="nli", train_file=train, dev_file=dev, text_columns=["premise", "hypothesis"], **extra)


def spread_task(tmp_path, n, seed=0):
    """Regression task, target = the example's index, sentences of 1 to 40 words (a realistic spread)."""
    rng = random.Random(seed)
    words = "river town story old green harbor ships open north people walk bread city".split()
    rows = [(" ".join(rng.choice(words) for _ in range(rng.randint(1, 40))), str(i)) for i in range(n)]
    train = write_rows(tmp_path / "spread.tsv", ["sentence", "label"], rows)
    return TaskConfig(train_file=train, text_columns=["sentence"], type="regression", max_seq_len=64)


def padded_share(batches) -> float:
    return 1 - sum(int(b["attention_mask"].sum()) for b in batches) / sum(b["attention_mask"].numel() for b in batches)


def index_task(tmp_path, n):
    """Regression task whose target is the example's index: batches tell which examples they hold."""
    rows = [(f"story number {i} of the river town.", str(i)) for i in range(n)]
    train = write_rows(tmp_path / "idx.tsv", ["sentence", "label"], rows)
    return TaskConfig(train_file=train, text_columns=["sentence"], type="regression", max_seq_len=16)


# --------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl"])
def test_pair_task_reads_the_same_from_every_format(tmp_path, suffix):
    task = load_task(pair_task(tmp_path, suffix))
    assert task.label_names == ["contradiction", "entailment", "neutral"]  # sorted: labels=[]
    assert task.num_labels == 3 and task.main_metric == "accuracy"
    assert [e.texts for e in task.train] == [p[:2] for p in PAIRS * 2]  # the csv comma field survives
    assert [task.label_names[e.label] for e in task.dev] == [p[2] for p in PAIRS[::-1]]
    assert task.train[1].source.endswith(f"train{suffix}:{2 if suffix == '.jsonl' else 3}")


def test_explicit_labels_keep_their_order_and_numeric_labels_sort_as_numbers(tmp_path):
    task = load_task(pair_task(tmp_path, labels=["entailment", "neutral", "contradiction"]))
    assert [e.label for e in task.train[:3]] == [0, 2, 1]
    rows = [("x y", str(v)) for v in (10, 2, 0, 2)]
    numeric = TaskConfig(train_file=write_rows(tmp_path / "n.jsonl", ["s", "label"], rows), text_columns=["s"])
    assert load_task(numeric).label_names == ["0", "2", "10"]
    as_ints = tmp_path / "i.jsonl"  # JSON numbers and strings name the same classes
    as_ints.write_text('{"s": "a", "label": 1}\n{"s": "b", "label": 0}\n{"s": "c", "label": "1"}\n')
    task = load_task(TaskConfig(train_file=str(as_ints), text_columns=["s"]))
    assert task.label_names == ["0", "1"] and [e.label for e in task.train] == [1, 0, 1]


def test_single_sentence_regression(tmp_path):
    rows = [("first one.", "4.5"), ("second.", "0"), ("third.", "2.25")]
    cfg = TaskConfig(train_file=write_rows(tmp_path / "s.csv", ["sentence", "score"], rows),
                     text_columns=["sentence"], label_column="score", type="regression")
    task = load_task(cfg)
    assert task.num_labels == 1 and task.label_names == [] and task.main_metric == "pearson"
    assert [e.label for e in task.train] == [4.5, 0.0, 2.25] and task.dev == []
    assert task.train[0].texts == ("first one.",)


@pytest.mark.parametrize("name,columns,labels,kind", [
    ("sentiment", 1, ["negative", "positive"], "classification"),
    ("pair", 2, ["entailment", "neutral", "contradiction"], "classification"),
    ("similarity", 2, [], "regression")])
def test_bundled_tasks(name, columns, labels, kind):
    task = load_task(TaskConfig(name=name))
    assert (len(task.text_columns), task.label_names, task.type) == (columns, labels, kind)
    assert len(task.train) > 100 and len(task.dev) > 50
    assert all(len(e.texts) == columns for e in task.train)


# --------------------------------------------------------------------------- bad input
def bad(tmp_path, name, text, **cfg):
    path = tmp_path / name
    path.write_text(text) if isinstance(text, str) else path.write_bytes(text)
    cfg.setdefault("text_columns", ["s"])
    return TaskConfig(train_file=str(path), **cfg)


@pytest.mark.parametrize("name,text,cfg,message", [
    ("t.tsv", "s\tlabel\na\tpos\nb\tneg\nc\tmaybe\n", {"labels": ["neg", "pos"]},
     r"t\.tsv:4: unknown label 'maybe'; the task's labels are neg, pos"),
    ("t.tsv", "s\tlabel\na\tpos\nb\tneg\textra\n", {}, r"t\.tsv:3: 3 fields, the header has 2"),
    ("t.tsv", "text\tlabel\na\tpos\n", {}, r"t\.tsv: no column 's' \(its columns: text, label\)"),
    ("t.csv", "", {}, r"t\.csv: the file is empty"),
    ("t.csv", "s,label\n", {}, r"t\.csv: no examples \(only a header\)"),
    ("t.csv", "s,label\na,1\nb,x\n", {"type": "regression"}, r"t\.csv:3: regression label 'x' is not a number"),
    ("t.jsonl", '{"s": "a", "label": 1}\n{"s": "b", label: 0}\n', {}, r"t\.jsonl:2: not valid JSON"),
    ("t.jsonl", '{"s": "a", "label": 1}\n\n{"text": "b", "label": 0}\n', {},
     r"t\.jsonl:3: no field 's' \(its fields: text, label\)"),
    ("t.jsonl", '{"s": 5, "label": 1}\n', {}, r"t\.jsonl:1: column 's' holds int 5, not text"),
    ("t.txt", "s\tlabel\n", {}, r"t\.txt: unsupported task file type '\.txt'"),
    ("t.json", '[{"s": "a", "label": 1}]\n', {}, r"t\.json:1: expected a JSON object, got list"),
    ("t.tsv", b"s\tlabel\na\t1\nb\xff\t0\n", {}, r"t\.tsv:3: not UTF-8 text"),
    ("t.tsv", "s\tlabel\na\t1\nb\t1\n", {}, r"a classification task needs at least 2 classes"),
])
def test_bad_files_name_file_and_line(tmp_path, name, text, cfg, message):
    with pytest.raises(DataError, match=message):
        load_task(bad(tmp_path, name, text, **cfg))


def test_dev_label_missing_from_train_is_an_error(tmp_path):
    cfg = bad(tmp_path, "train.tsv", "s\tlabel\na\tpos\nb\tneg\n")
    (tmp_path / "dev.tsv").write_text("s\tlabel\na\tpos\nb\tneutral\n")
    cfg.dev_file = str(tmp_path / "dev.tsv")
    with pytest.raises(DataError, match=r"dev\.tsv:3: unknown label 'neutral'; the task's labels are neg, pos"):
        load_task(cfg)


def test_missing_file_and_bad_task_config(tmp_path):
    with pytest.raises(DataError, match=r"nope\.tsv: task file not found"):
        load_task(TaskConfig(train_file=str(tmp_path / "nope.tsv"), text_columns=["s"]))
    with pytest.raises(ConfigError, match=r"task\.train_file: not set, and task\.name 'mine' is not a bundled"):
        load_task(TaskConfig(name="mine"))
    with pytest.raises(ConfigError, match=r"task\.text_columns: give one column"):
        load_task(TaskConfig(train_file="x.tsv", text_columns=["a", "b", "c"]))
    with pytest.raises(ConfigError, match=r"the bundled task 'sentiment' is classification, not regression"):
        load_task(TaskConfig(name="sentiment", type="regression"))


# --------------------------------------------------------------------------- encoding and loader
def test_pairs_encode_like_the_tokenizer_with_segment_ids(tmp_path, tokenizer):
    task = load_task(pair_task(tmp_path, max_seq_len=12))
    batch = encode_batch(task.train[:3], tokenizer, 12, task.type, with_labels=True)
    ref = tokenizer([p[0] for p in PAIRS], [p[1] for p in PAIRS], truncation=True, max_length=12,
                    padding="max_length", return_tensors="pt")
    assert batch["input_ids"].shape == (3, 12)  # longest is truncated to 12
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        assert torch.equal(batch[key], ref[key]), key
    assert batch["token_type_ids"].sum() > 0 and batch["labels"].tolist() == [1, 0, 2]
    wide = encode_batch(task.train[:2], tokenizer, 128, task.type, with_labels=False)
    lengths = [len(tokenizer(*PAIRS[i][:2])["input_ids"]) for i in range(2)]
    assert wide["input_ids"].shape[1] == max(lengths) and "labels" not in wide  # no rounding up
    assert wide["attention_mask"].sum(1).tolist() == lengths


def test_dev_batches_are_cut_by_length_and_keep_their_labels(tmp_path, tokenizer):
    """Dev batches come sorted by length; each row's label travels with it, so metrics are unchanged."""
    task = load_task(spread_task(tmp_path, 300))
    task.dev = task.train
    batches = list(iter_dev_batches(task, tokenizer, batch_size=8))
    rows = [(int(n), int(label)) for b in batches for n, label in zip(b["attention_mask"].sum(1), b["labels"])]
    lengths = token_lengths(task.dev, tokenizer, task.max_seq_len)
    assert sorted(label for _, label in rows) == list(range(300))  # every example once
    assert all(n == lengths[label] for n, label in rows)  # the label is the row's own
    assert [n for n, _ in rows] == sorted(lengths.tolist())
    assert all(len(b["labels"]) <= 8 and padded_share([b]) <= 0.05 for b in batches)
    assert len(batches) <= 300 // 8 + len(set(lengths.tolist()))  # cut at length steps, not row by row


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory):
    from corpus_fixtures import load, train_sentencepiece
    return load(train_sentencepiece(tmp_path_factory.mktemp("sp")))


def _length_examples(pair: bool) -> list:
    """Single texts or pairs of 0-60 words, repeats among them (premises recur), some over max_seq_len with
    either text the longer one (longest-first truncation cuts that one)."""
    from ernie_tiny_ds.data.tasks import Example

    rng = random.Random()
    words = "doc7 the river town , old green harbor . ships open north people walk bread city é naïve 12".split()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(0 if pair else 1, 60))) for _ in range(60)]
    texts += ["", " ", "un-break-able café !", "a" * 300]
    rows = [tuple(rng.choice(texts) for _ in range(2 if pair else 1)) for _ in range(150)]
    return [Example(texts=row, label=0, source=f"t:{i}") for i, row in enumerate(rows)]


@pytest.mark.parametrize("pair", [False, True])
@pytest.mark.parametrize("which", ["tokenizer", "sentencepiece"])
def test_token_lengths_equal_each_examples_own_encoding(request, pair, which):
    """The rows the batches hold: encode_batch, one example at a time."""
    tok = request.getfixturevalue(which)  # wordpiece with [CLS]/[SEP], and a unigram model that adds none
    examples = _length_examples(pair)
    for max_len in (16, 40, 512):
        own = [int(encode_batch([e], tok, max_len, "classification", False)["attention_mask"].sum())
               for e in examples]
        assert token_lengths(examples, tok, max_len).tolist() == own
        assert max_len > 100 or max_len in own  # the truncation case was exercised


def test_token_lengths_count_each_distinct_text_once(tokenizer, monkeypatch):
    from ernie_tiny_ds.data.packing import TokenEncoder

    counted = []
    real = TokenEncoder.lengths

    def recording(self, texts):
        counted.extend(texts)
        return real(self, texts)

    monkeypatch.setattr(TokenEncoder, "lengths", recording)
    examples = _length_examples(pair=True)
    token_lengths(examples, tokenizer, 64)
    assert sorted(counted) == sorted({t for e in examples for t in e.texts})
    assert token_lengths([], tokenizer, 64).tolist() == []


def test_predictions_come_back_in_example_order(tmp_path, tokenizer):
    """predict batches by length and puts every output back at its example's place."""
    from ernie_tiny_ds.workflows.predict import predict_outputs

    class LengthModel(torch.nn.Module):  # a model whose output is the row's token count
        config = types.SimpleNamespace(num_labels=1)

        def forward(self, input_ids, attention_mask, token_type_ids):
            return types.SimpleNamespace(logits=attention_mask.sum(1, keepdim=True).float())

    task = load_task(spread_task(tmp_path, 50))
    outputs = predict_outputs(LengthModel(), tokenizer, task, task.train, batch_size=8)
    assert outputs[:, 0].tolist() == token_lengths(task.train, tokenizer, task.max_seq_len).tolist()


def labels_of(loader, n):
    it = iter(loader)
    return [next(it)["labels"].long().tolist() for _ in range(n)]


def test_rank_shards_are_disjoint_and_step_together(tmp_path, tokenizer):
    task = load_task(index_task(tmp_path, 50))
    loaders = [TaskLoader(task, tokenizer, 4, rank, 2, seed=3, with_labels=True) for rank in range(2)]
    assert [l.batches_per_epoch for l in loaders] == [6, 6]  # 50 // (4 * 2)
    epochs = [labels_of(l, 12) for l in loaders]
    for epoch in (slice(0, 6), slice(6, 12)):
        seen = [sorted(i for batch in e[epoch] for i in batch) for e in epochs]
        assert len(seen[0]) == len(seen[1]) == 24
        assert not set(seen[0]) & set(seen[1]) and len(set(seen[0]) | set(seen[1])) == 48
    order0 = [i for batch in epochs[0][:6] for i in batch]
    order1 = [i for batch in epochs[0][6:] for i in batch]
    assert order0 != order1  # a new shuffle each epoch
    again = TaskLoader(task, tokenizer, 4, 0, 2, seed=3, with_labels=True)
    other = TaskLoader(task, tokenizer, 4, 0, 2, seed=4, with_labels=True)
    assert labels_of(again, 12) == epochs[0] and labels_of(other, 6) != epochs[0][:6]


def test_resume_continues_with_the_next_batch(tmp_path, tokenizer):
    task = load_task(index_task(tmp_path, 30))
    straight = labels_of(TaskLoader(task, tokenizer, 4, 1, 2, seed=0, with_labels=True), 9)
    first = TaskLoader(task, tokenizer, 4, 1, 2, seed=0, with_labels=True)
    assert labels_of(first, 5) == straight[:5]  # crosses the epoch end (3 batches per epoch)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    second = TaskLoader(task, tokenizer, 4, 1, 2, seed=0, with_labels=True)
    second.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert labels_of(second, 4) == straight[5:]
    wrong = TaskLoader(task, tokenizer, 4, 0, 1, seed=0, with_labels=True)
    with pytest.raises(DataError, match="saved with world_size=2, this run has world_size=1"):
        wrong.load_state_dict(first.state_dict())


def test_train_batches_are_length_grouped_once_per_epoch_per_rank_and_resume_exactly(tmp_path, tokenizer):
    task = load_task(spread_task(tmp_path, 403))  # 403 = 12 global batches of 2 x 16, and a tail of 19

    def epochs(rank, seed=5, count=24):
        it = iter(TaskLoader(task, tokenizer, 16, rank, 2, seed=seed, with_labels=True))
        return [next(it) for _ in range(count)]

    ranks = [epochs(0), epochs(1)]
    assert padded_share(ranks[0] + ranks[1]) < 0.05  # plain shuffle order: about half of every batch
    for epoch in (slice(0, 12), slice(12, 24)):
        seen = [[int(i) for b in r[epoch] for i in b["labels"]] for r in ranks]
        assert len(set(seen[0])) == len(seen[0]) == len(set(seen[1])) == 192  # once per epoch
        assert not set(seen[0]) & set(seen[1])  # rank-disjoint
    labels = [[b["labels"].tolist() for b in r] for r in ranks]
    assert labels[0][:12] != labels[0][12:] and set(map(tuple, labels[0][:12])) != set(map(tuple, labels[0][12:]))
    assert [b["labels"].tolist() for b in epochs(0)] == labels[0]  # deterministic by seed
    assert [b["labels"].tolist() for b in epochs(0, seed=6)] != labels[0]

    first = TaskLoader(task, tokenizer, 16, 1, 2, seed=5, with_labels=True)
    it = iter(first)
    for _ in range(7):  # the middle of the first epoch
        next(it)
    second = TaskLoader(task, tokenizer, 16, 1, 2, seed=5, with_labels=True)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    rest = iter(second)
    for want in ranks[1][7:]:
        got = next(rest)
        assert all(torch.equal(got[key], want[key]) for key in want)


def test_a_position_saved_before_length_grouping_finishes_its_epoch_in_the_old_order(tmp_path, tokenizer):
    task = load_task(index_task(tmp_path, 40))
    loader = TaskLoader(task, tokenizer, 4, 0, 2, seed=1, with_labels=True)
    old_state = {k: v for k, v in loader.state_dict().items() if k != "order"}
    old_state["batches_in_epoch"] = 2
    loader.load_state_dict(old_state)
    plain = np.random.default_rng([1, 0]).permutation(40)  # the old order: the bare permutation
    got = labels_of(loader, 3)
    assert got == [sorted_as(plain[(b * 2) * 4:(b * 2) * 4 + 4]) for b in (2, 3, 4)]
    assert loader.epoch_order(1).tolist() != np.random.default_rng([1, 1]).permutation(40).tolist()


def sorted_as(indices) -> list[int]:
    return [int(i) for i in indices]


def test_too_few_examples_for_one_global_batch(tmp_path, tokenizer):
    task = load_task(index_task(tmp_path, 7))
    with pytest.raises(DataError, match=r"idx\.tsv: 7 examples do not fill one batch of 4 on each of 2 rank"):
        TaskLoader(task, tokenizer, 4, 0, 2, seed=0, with_labels=False)

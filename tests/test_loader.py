"""The streaming general-corpus loader: coverage per (rank, worker), exact resume, formats, bad input."""
from __future__ import annotations

import bz2
import dataclasses
import gzip
import io
import json
import os
import re
import tracemalloc
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from corpus_fixtures import (
    batch_sequences,
    decoded_counts,
    document,
    load,
    sentence_counts,
    train_sentencepiece,
    write_id_corpus,
)

from ernie_tiny_ds.config import DataConfig
from ernie_tiny_ds.data import sources
from ernie_tiny_ds.data.corpus import build_general_loader
from ernie_tiny_ds.data.sharding import Consumer
from ernie_tiny_ds.data.sources import DataWarning, ReadStats, corpus_sources
from ernie_tiny_ds.data.stream import SequenceStream
from ernie_tiny_ds.errors import DataError


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory):
    return load(train_sentencepiece(tmp_path_factory.mktemp("sp")))


def config(corpus, **kw) -> DataConfig:
    # packing=document: these tests read each document back from its own sequences
    return dataclasses.replace(DataConfig(corpus=str(corpus), max_seq_len=32, shuffle_buffer=8, packing="document"),
                               **kw)


def epochs(stream: SequenceStream, count: int, cap: int = 100_000) -> list[list[list[int]]]:
    """The sequences the stream hands out in each of its first `count` epochs."""
    out: list[list[list[int]]] = [[] for _ in range(count)]
    for _ in range(cap):
        seq = stream.next_sequence()
        if stream.epoch == count:
            return out
        out[stream.epoch].append(seq)
    raise AssertionError("epochs never ended")


def one_epoch(stream: SequenceStream) -> list[list[int]]:
    return epochs(stream, 1)[0]


def take(loader, n: int) -> list[dict]:
    it = iter(loader)
    batches = [next(it) for _ in range(n)]
    it.close()  # shuts DataLoader workers down
    return batches


def roundtrip(state: dict) -> dict:
    """As train.py stores it: torch.save, then torch.load(weights_only=True)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# --- coverage ------------------------------------------------------------------------------------

@pytest.mark.parametrize("files", [8, 3], ids=["whole-files", "interleaved-records"])
def test_two_ranks_two_workers_see_every_document_once(wordpiece, tmp_path, files):
    # 61: file sizes that are not multiples of the 4 consumers, so interleaving depends on the file order
    docs = write_id_corpus(tmp_path / "corpus", documents=61, files=files)
    cfg = config(tmp_path / "corpus")
    srcs = corpus_sources(cfg, ReadStats())
    seen, sizes = Counter(), []
    for rank in (0, 1):
        for worker in (0, 1):
            stream = SequenceStream(srcs, cfg, wordpiece, Consumer(rank, 2, worker, 2), seed=5)
            epoch0 = one_epoch(stream)
            sizes.append(len(epoch0))
            seen += decoded_counts(wordpiece, epoch0)
    assert seen == sentence_counts(docs)
    assert min(sizes) > 0


def test_each_epoch_has_a_new_order(wordpiece, tmp_path):
    write_id_corpus(tmp_path / "corpus", documents=40, files=4)
    cfg = config(tmp_path / "corpus")
    stream = SequenceStream(corpus_sources(cfg, ReadStats()), cfg, wordpiece, Consumer(0, 1, 0, 1), seed=1)
    first, second = epochs(stream, 2)
    assert sorted(first) == sorted(second)
    assert first != second


def _rank_epoch(cfg: DataConfig, tokenizer, rank: int, out: Path) -> None:
    """One rank in its own process: batches of 1 from 2 DataLoader workers until both finished epoch 0."""
    loader = build_general_loader(cfg, tokenizer, 1, rank, 2, seed=7)
    it, finished, sequences = iter(loader), set(), []
    while len(finished) < 2:
        worker = loader.state_dict()["next_worker"]
        batch = next(it)
        if loader.state_dict()["streams"][worker]["window_start"]["epoch"] > 0:
            finished.add(worker)
        else:
            sequences += batch_sequences(batch)
    it.close()
    out.write_text(json.dumps(sequences))


def test_two_rank_processes_with_dataloader_workers_cover_the_epoch(wordpiece, tmp_path):
    """2 rank processes x 2 torch DataLoader worker processes each: every document once in epoch 0."""
    import multiprocessing
    docs = write_id_corpus(tmp_path / "corpus", documents=41, files=2)
    cfg = config(tmp_path / "corpus", num_workers=2)
    context = multiprocessing.get_context("fork")
    ranks = [context.Process(target=_rank_epoch, args=(cfg, wordpiece, r, tmp_path / f"rank{r}.json")) for r in (0, 1)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=120)
        assert p.exitcode == 0
    seen = Counter()
    for r in (0, 1):
        seen += decoded_counts(wordpiece, json.loads((tmp_path / f"rank{r}.json").read_text()))
    assert seen == sentence_counts(docs)


# --- resume --------------------------------------------------------------------------------------

def _write_as(fmt: str, docs: dict[int, str], folder: Path) -> Path:
    """The same documents in another container; returns the corpus path."""
    folder.mkdir(parents=True, exist_ok=True)
    texts = list(docs.values())
    lines = "".join(t + "\n" for t in texts).encode()
    if fmt == "txt":
        (folder / "a.txt").write_bytes(lines)
    elif fmt == "gz":
        (folder / "a.txt.gz").write_bytes(gzip.compress(lines))
    elif fmt == "bz2":
        (folder / "a.txt.bz2").write_bytes(bz2.compress(lines))
    elif fmt == "zst":
        import zstandard
        (folder / "a.txt.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    elif fmt == "blank_line":  # one sentence per line, documents separated by blank lines
        (folder / "a.txt").write_text("\n\n".join("\n".join(re.split(r"(?<=\.) ", t)) for t in texts) + "\n")
    elif fmt in ("jsonl", "datasets"):
        body = "".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(texts))
        (folder / "a.jsonl").write_text(body)
    elif fmt == "jsonl.gz":
        body = "".join(json.dumps({"body": t}) + "\n" for t in texts).encode()
        (folder / "a.jsonl.gz").write_bytes(gzip.compress(body))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"body": texts}), folder / "a.parquet", row_group_size=7)
    return folder


def _format_config(fmt: str, folder: Path, **kw) -> DataConfig:
    extra = {"blank_line": {"document_separator": "blank_line"}, "jsonl": {"text_field": "body"},
             "jsonl.gz": {"text_field": "body"}, "parquet": {"text_field": "body"},
             "datasets": {"text_field": "body", "format": "datasets"}}.get(fmt, {})
    return config(folder, **extra, **kw)


@pytest.mark.parametrize("tok,workers,fmt", [("wordpiece", 0, "txt"), ("sentencepiece", 0, "txt"),
                                             ("wordpiece", 2, "txt"), ("sentencepiece", 2, "txt"),
                                             ("wordpiece", 0, "gz"), ("wordpiece", 0, "zst"),
                                             ("wordpiece", 0, "jsonl"), ("wordpiece", 0, "parquet")])
def test_restart_continues_with_the_same_batches(request, tmp_path, tok, workers, fmt):
    tokenizer = request.getfixturevalue(tok)
    docs = write_id_corpus(tmp_path / "gen", documents=30, files=1, seed=3)
    cfg = _format_config(fmt, _write_as(fmt, docs, tmp_path / "corpus"), num_workers=workers)
    total = 24  # several windows and more than one epoch per rank
    straight = take(build_general_loader(cfg, tokenizer, 3, 1, 2, seed=11), total)
    for stop in (5, 17):
        first = build_general_loader(cfg, tokenizer, 3, 1, 2, seed=11)
        it = iter(first)
        for _ in range(stop):
            next(it)
        state = roundtrip(first.state_dict())
        it.close()
        resumed = build_general_loader(cfg, tokenizer, 3, 1, 2, seed=11)
        resumed.load_state_dict(state)
        for expected, got in zip(straight[stop:], take(resumed, total - stop)):
            for key in ("input_ids", "attention_mask", "token_type_ids"):
                # padded to the batch's longest sequence exactly (bound for the CPU), at most max_seq_len 32
                width = int(got["attention_mask"].sum(1).max())
                assert got[key].dtype == torch.int64 and got[key].shape == (3, width) and width <= 32
                assert torch.equal(expected[key], got[key]), f"batch differs after resuming at {stop}"


def test_state_from_another_setup_is_refused(wordpiece, tmp_path):
    write_id_corpus(tmp_path / "corpus", documents=10, files=2)
    state = build_general_loader(config(tmp_path / "corpus"), wordpiece, 2, 0, 2, seed=1).state_dict()
    with pytest.raises(DataError, match="world_size=2"):
        build_general_loader(config(tmp_path / "corpus"), wordpiece, 2, 0, 1, seed=1).load_state_dict(state)


# --- formats -------------------------------------------------------------------------------------

def _epoch_sequences(cfg: DataConfig, tokenizer) -> list[list[int]]:
    stream = SequenceStream(corpus_sources(cfg, ReadStats()), cfg, tokenizer, Consumer(0, 1, 0, 1), seed=2)
    return one_epoch(stream)


@pytest.mark.parametrize("fmt", ["gz", "bz2", "zst", "blank_line", "jsonl", "jsonl.gz", "parquet", "datasets"])
def test_every_format_gives_the_plain_text_sequences(wordpiece, tmp_path, fmt):
    docs = write_id_corpus(tmp_path / "gen", documents=25, files=1, seed=4)
    plain = _epoch_sequences(config(_write_as("txt", docs, tmp_path / "plain")), wordpiece)
    other = _epoch_sequences(_format_config(fmt, _write_as(fmt, docs, tmp_path / fmt)), wordpiece)
    assert sorted(other) == sorted(plain)
    assert decoded_counts(wordpiece, other) == sentence_counts(docs)
    if fmt in ("gz", "bz2", "zst"):  # same decompressed offsets, hence the same shuffle
        assert other == plain


def test_default_corpus_is_the_bundled_one(wordpiece):
    from ernie_tiny_ds.assets import DEFAULT_CORPUS_DIR
    bundled = sorted(DEFAULT_CORPUS_DIR.glob("*.txt"))
    vocabulary = set(re.findall(r"[a-z]+", " ".join(p.read_text(encoding="utf-8").lower() for p in bundled)))
    loader = build_general_loader(DataConfig(max_seq_len=32), wordpiece, 2, 0, 1, seed=0)
    assert [os.path.realpath(p) for p in loader.sources] == [os.path.realpath(p) for p in bundled]
    batch = take(loader, 1)[0]
    assert batch["input_ids"].shape[0] == 2 and batch["input_ids"].shape[1] <= 32
    for row in batch_sequences(batch):
        words = re.findall(r"[a-z]+", wordpiece.decode(row[1:-1]).replace("[UNK]", " "))
        assert len(words) >= 3 and set(words[1:-1]) <= vocabulary  # the ends may be cut mid-word


# --- bad input -----------------------------------------------------------------------------------

def test_invalid_utf8_is_replaced_counted_and_warned_once_per_file(wordpiece, tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_bytes(b"doc1 the river \xff town.\ndoc2 old \xfe\xfe road.\ndoc3 open book.\n")
    (folder / "b.txt").write_bytes(b"doc4 green \xc3 field.\n")
    cfg = config(folder)
    stats = ReadStats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stream = SequenceStream(corpus_sources(cfg, stats), cfg, wordpiece, Consumer(0, 1, 0, 1), seed=0, stats=stats)
        seqs = one_epoch(stream)
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert len(messages) == 2 and any(str(folder / "a.txt") in m for m in messages) \
        and any(str(folder / "b.txt") in m for m in messages)
    assert stats.invalid_utf8 == {str(folder / "a.txt"): 2, str(folder / "b.txt"): 1}
    assert decoded_counts(wordpiece, seqs) == Counter({1: 1, 2: 1, 3: 1, 4: 1})  # nothing dropped


def test_empty_files_and_blank_lines_are_skipped(wordpiece, tmp_path):
    folder = tmp_path / "corpus"
    docs = write_id_corpus(folder, documents=12, files=2)
    (folder / "empty.txt").write_text("")
    (folder / "blanks.txt").write_text("\n   \n\t\n" + docs[0] + "\n\n\n")
    expected = sentence_counts(docs)
    expected[0] *= 2
    seqs = _epoch_sequences(config(folder), wordpiece)
    assert decoded_counts(wordpiece, seqs) == expected
    assert all(len(s) > 2 for s in seqs)
    # four files for four consumers, one empty: no consumer may be left with only the empty file
    cfg = config(folder)
    srcs = corpus_sources(cfg, ReadStats())
    assert str(folder / "empty.txt") not in srcs
    seen = Counter()
    for rank in (0, 1):
        for worker in (0, 1):
            stream = SequenceStream(srcs, cfg, wordpiece, Consumer(rank, 2, worker, 2), seed=0)
            seen += decoded_counts(wordpiece, one_epoch(stream))
    assert seen == expected


@pytest.mark.parametrize("compressed", [False, True])
def test_binary_file_is_named_or_skipped(wordpiece, tmp_path, compressed):
    folder = tmp_path / "corpus"
    docs = write_id_corpus(folder, documents=10, files=2)
    blob = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8
    binary = folder / ("image.png.gz" if compressed else "image.png")
    binary.write_bytes(gzip.compress(blob) if compressed else blob)
    with pytest.raises(DataError, match=re.escape(str(binary))):
        build_general_loader(config(folder), wordpiece, 2, 0, 1, seed=0)
    with pytest.warns(DataWarning, match=re.escape(str(binary))):
        cfg = config(folder, on_binary_file="skip")
        srcs = corpus_sources(cfg, ReadStats())
    assert str(binary) not in srcs
    seqs = one_epoch(SequenceStream(srcs, cfg, wordpiece, Consumer(0, 1, 0, 1), seed=0))
    assert decoded_counts(wordpiece, seqs) == sentence_counts(docs)


def test_glob_matching_nothing_is_named(wordpiece, tmp_path):
    pattern = str(tmp_path / "nowhere" / "*.txt")
    with pytest.raises(DataError, match=re.escape(pattern)):
        build_general_loader(config(pattern), wordpiece, 2, 0, 1, seed=0)


def test_unknown_datasets_name_is_a_data_error(wordpiece, tmp_path):
    loader = build_general_loader(config(tmp_path / "no-such-dataset", format="datasets"), wordpiece, 2, 0, 1, seed=0)
    with pytest.raises(DataError, match="no-such-dataset"):
        take(loader, 1)


def test_ten_megabyte_line_is_split_within_bounded_memory(wordpiece, tmp_path):
    sentence = document(0, __import__("random").Random(0), 1)
    repeats = 10_000_000 // (len(sentence) + 1) + 1
    (tmp_path / "huge.txt").write_text(" ".join([sentence] * repeats) + "\n")
    cfg = config(tmp_path / "huge.txt", max_seq_len=128, shuffle_buffer=64)
    per_sentence = len(wordpiece(sentence, add_special_tokens=False)["input_ids"])
    stream = SequenceStream(corpus_sources(cfg, ReadStats()), cfg, wordpiece, Consumer(0, 1, 0, 1), seed=0)
    tracemalloc.start()
    try:
        tokens = sequences = 0
        while True:
            seq = stream.next_sequence()
            if stream.epoch:
                break
            assert len(seq) <= 128
            tokens, sequences = tokens + len(seq) - 2, sequences + 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert tokens == per_sentence * repeats
    assert sequences >= tokens // 126
    assert peak < 80 * 2**20, f"python peak {peak / 2**20:.0f} MiB for a 10 MB line"


def test_line_beyond_the_record_limit_is_refused_with_its_place(wordpiece, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_RECORD_BYTES", 1000)
    (tmp_path / "a.txt").write_text("doc1 short line.\n" + "word " * 400 + "\n")
    loader = build_general_loader(config(tmp_path / "a.txt"), wordpiece, 2, 0, 1, seed=0)
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "a.txt")) + ".*line 2"):
        take(loader, 1)


@pytest.mark.parametrize("body,message", [
    ('{"body": "doc1 fine."}\n{"body": oops\n', r"a\.jsonl: line 2: not valid JSON"),
    ('{"body": "doc1 fine."}\n{"text": "doc2"}\n', r"a\.jsonl: line 2: no field 'body'"),
    ('{"body": 12}\n', r"a\.jsonl: line 1: field 'body' is int")])
def test_bad_json_lines_name_file_and_line(wordpiece, tmp_path, body, message):
    (tmp_path / "a.jsonl").write_text(body)
    loader = build_general_loader(config(tmp_path / "a.jsonl", text_field="body"), wordpiece, 2, 0, 1, seed=0)
    with pytest.raises(DataError, match=message):
        take(loader, 1)


@pytest.mark.parametrize("tok", ["wordpiece", "sentencepiece", "bundled"])
def test_backend_encoder_gives_the_tokenizer_ids(request, tok, tokenizer_dir):
    from ernie_tiny_ds.data.packing import TokenEncoder
    tokenizer = load(tokenizer_dir) if tok == "bundled" else request.getfixturevalue(tok)
    texts = ["doc3 The river town, old   bridge!", "doc12 caf\u00e9 na\u00efve \u00fcber stra\u00dfe.", "  x  ",
             "doc1 \ufffd road"]
    assert TokenEncoder(tokenizer)(texts) == tokenizer(texts, add_special_tokens=False)["input_ids"]


def test_blank_line_document_without_end_is_refused(wordpiece, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_RECORD_BYTES", 1000)
    (tmp_path / "a.txt").write_text("doc1 one.\n\n" + "doc2 many lines.\n" * 100)
    loader = build_general_loader(config(tmp_path / "a.txt", document_separator="blank_line"), wordpiece, 2, 0, 1, 0)
    with pytest.raises(DataError, match=re.escape(str(tmp_path / "a.txt")) + ".*from line 3.*blank line"):
        take(loader, 1)


def test_pack_ids_fills_with_whole_sentences_and_cuts_only_long_ones():
    from ernie_tiny_ds.data.packing import pack_ids
    ends = frozenset({0})
    assert pack_ids([5, 5, 0, 6, 6, 6, 6, 0, 7, 0], ends, room=5) == [[5, 5, 0], [6, 6, 6, 6, 0], [7, 0]]
    assert pack_ids([5, 0, 6, 0, 1] + [2] * 11 + [0, 3], ends, room=5) == \
        [[5, 0, 6, 0], [1, 2, 2, 2, 2], [2] * 5, [2, 2, 0, 3]]
    assert pack_ids([4, 4, 4], ends, room=5) == [[4, 4, 4]] and pack_ids([], ends, room=5) == []


@pytest.mark.parametrize("tok", ["wordpiece", "sentencepiece"])
def test_documents_pack_into_whole_sentences(request, tok):
    from ernie_tiny_ds.data.packing import TokenEncoder, pack_pieces
    tokenizer = request.getfixturevalue(tok)
    text = document(5, __import__("random").Random(1), 12)
    [sequences] = pack_pieces([text], TokenEncoder(tokenizer), 32)
    sentences = [len(s) - 2 for s in sequences]
    assert len(sequences) > 2 and max(sentences) <= 30
    decoded = [tokenizer.decode(s[1:-1]) for s in sequences]
    assert all(d.endswith(".") and d.startswith("doc5") for d in decoded), decoded
    assert " ".join(decoded).lower() == text.lower()

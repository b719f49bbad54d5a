"""`ernie-tiny-ds preprocess` and the token-shard reader: counts, coverage, exact resume, atomic output."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from corpus_fixtures import batch_sequences, decoded_counts, load, sentence_counts, write_id_corpus

from ernie_tiny_ds.config import DataConfig
from ernie_tiny_ds.data import indexed
from ernie_tiny_ds.data.corpus import build_general_loader
from ernie_tiny_ds.data.indexed import ShardLoader
from ernie_tiny_ds.data.preprocess import preprocess
from ernie_tiny_ds.data.sharding import Consumer
from ernie_tiny_ds.data.sources import ReadStats, corpus_sources
from ernie_tiny_ds.data.stream import SequenceStream
from ernie_tiny_ds.errors import DataError, UserError

REPO = Path(__file__).resolve().parent.parent
SEQ = 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[int, str]]:
    folder = tmp_path_factory.mktemp("corpus")
    docs = write_id_corpus(folder, documents=70, files=3, seed=9)
    (folder / "empty.txt").write_text("\n\n")
    return folder, docs


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "ernie_tiny_ds.cli", "preprocess", *args], capture_output=True,
                          text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, corpus, wordpiece_dir) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("shards") / "wp-32"
    done = _cli("--input", str(corpus[0]), "--tokenizer", wordpiece_dir, "--output", str(out),
                "--max-seq-len", str(SEQ), "--workers", "2", "--packing", "document")
    assert done.returncode == 0, done.stderr
    return out, done


def _all_sequences(folder: Path) -> list[list[int]]:
    meta = json.loads((folder / "meta.json").read_text())
    out = []
    for shard in meta["shards"]:
        tokens = np.fromfile(folder / f"{shard['name']}.bin", dtype=meta["dtype"])
        offsets = np.fromfile(folder / f"{shard['name']}.idx", dtype=np.int64)
        out += [tokens[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
    return out


@pytest.mark.slow
def test_cli_prints_and_stores_the_right_counts(shards, corpus, wordpiece):
    out, done = shards
    folder, docs = corpus
    tokens = sum(len(wordpiece(t, add_special_tokens=False)["input_ids"]) for t in docs.values())
    sequences = _all_sequences(out)
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["documents"], meta["tokens"], meta["sequences"]) == (len(docs), tokens, len(sequences))
    assert f"documents: {len(docs)}  tokens: {tokens}  sequences: {len(sequences)}" in done.stdout
    assert len(meta["shards"]) == 2 and "preprocess" in done.stderr  # two worker shards; the tqdm bar
    assert all(len(s) <= SEQ for s in sequences)
    assert decoded_counts(wordpiece, sequences) == sentence_counts(docs)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "temporary folder left behind"


@pytest.mark.slow
def test_shards_hold_the_streaming_loaders_sequences(shards, corpus, wordpiece):
    cfg = DataConfig(corpus=str(corpus[0]), max_seq_len=SEQ, shuffle_buffer=8, packing="document")
    stream = SequenceStream(corpus_sources(cfg, ReadStats()), cfg, wordpiece, Consumer(0, 1, 0, 1), seed=0)
    streamed = []
    while True:
        seq = stream.next_sequence()
        if stream.epoch:
            break
        streamed.append(seq)
    assert sorted(_all_sequences(shards[0])) == sorted(streamed)


def _shard_cfg(folder: Path) -> DataConfig:
    return DataConfig(corpus=str(folder), source="shards", max_seq_len=SEQ)


@pytest.mark.slow
def test_two_ranks_read_every_sequence_once_per_epoch(shards, corpus, wordpiece):
    per_epoch, orders = [Counter(), Counter()], []
    for rank in (0, 1):
        loader = build_general_loader(_shard_cfg(shards[0]), wordpiece, 1, rank, 2, seed=4)
        assert isinstance(loader, ShardLoader)
        epochs: list[list] = [[], []]
        for batch in loader:
            epoch = loader.state_dict()["epoch"]  # batch size 1: the epoch its sequence came from
            if epoch == 2:
                break
            epochs[epoch] += batch_sequences(batch)
        for e in (0, 1):
            per_epoch[e] += decoded_counts(wordpiece, epochs[e])
        orders.append(epochs)
    assert per_epoch[0] == per_epoch[1] == sentence_counts(corpus[1])
    assert orders[0][0] != orders[0][1]  # a new order each epoch


@pytest.mark.slow
def test_shard_reader_resumes_exactly(shards, wordpiece):
    def loader():
        return build_general_loader(_shard_cfg(shards[0]), wordpiece, 4, 1, 2, seed=8)

    total = 30  # more than one epoch per rank
    it = iter(loader())
    straight = [next(it) for _ in range(total)]
    for stop in (3, 14):
        first, buffer = loader(), io.BytesIO()
        it = iter(first)
        for _ in range(stop):
            next(it)
        torch.save(first.state_dict(), buffer)
        buffer.seek(0)
        resumed = loader()
        resumed.load_state_dict(torch.load(buffer, weights_only=True))
        it = iter(resumed)
        for expected in straight[stop:]:
            got = next(it)
            assert all(torch.equal(expected[k], got[k]) for k in ("input_ids", "attention_mask", "token_type_ids"))


@pytest.mark.slow  # the shards fixture runs `preprocess` as a process
def test_shard_batch_widths_round_up_to_8_only_for_cuda(shards, wordpiece):
    def first_batches(device) -> list[dict]:
        it = iter(build_general_loader(_shard_cfg(shards[0]), wordpiece, 3, 0, 1, seed=2, device=device))
        return [next(it) for _ in range(20)]

    cpu, cuda = first_batches("cpu"), first_batches(torch.device("cuda"))
    assert [batch_sequences(b) for b in cpu] == [batch_sequences(b) for b in cuda]
    longest = [int(b["attention_mask"].sum(1).max()) for b in cpu]
    assert [b["input_ids"].shape[1] for b in cpu] == longest
    assert [b["input_ids"].shape[1] for b in cuda] == [min(SEQ, -(-n // 8) * 8) for n in longest] != longest


@pytest.mark.slow
def test_shard_order_is_the_same_whatever_block_of_it_is_computed_at_once(shards, wordpiece, monkeypatch):
    def first_two_epochs(block: int, rank: int) -> list[np.ndarray]:
        monkeypatch.setattr(indexed, "ORDER_BLOCK", block)
        loader = ShardLoader(str(shards[0]), wordpiece, 1, rank, 2, seed=5, max_seq_len=SEQ)
        epochs = [[], []]
        while True:
            index = loader._next_indices()[0]  # batch size 1: the epoch it came from is the loader's
            if loader.epoch == 2:
                return [np.array(e) for e in epochs]
            epochs[loader.epoch].append(index)

    n = len(indexed.TokenShards(str(shards[0])))
    for rank in (0, 1):
        whole = first_two_epochs(8192, rank)
        assert all(np.array_equal(a, b) for a, b in zip(first_two_epochs(5, rank), whole))  # blocks of 5 slots
    for epoch in (0, 1):
        both = np.concatenate([first_two_epochs(5, rank)[epoch] for rank in (0, 1)])
        assert np.array_equal(np.sort(both), np.arange(n))


@pytest.mark.slow
def test_shard_reader_refuses_a_position_saved_under_another_order(shards, wordpiece):
    loader = build_general_loader(_shard_cfg(shards[0]), wordpiece, 4, 0, 2, seed=8)
    state = loader.state_dict()
    del state["order"]  # as saved by the reader that materialised its permutation
    with pytest.raises(DataError, match="saved with order=None, this run has order=feistel"):
        loader.load_state_dict(state)


@pytest.mark.slow
def test_shards_refuse_a_foreign_tokenizer_a_shorter_length_and_truncation(shards, tmp_path, wordpiece):
    from corpus_fixtures import train_sentencepiece
    other = load(train_sentencepiece(tmp_path / "sp"))
    with pytest.raises(DataError, match="does not match"):
        build_general_loader(_shard_cfg(shards[0]), other, 2, 0, 1, seed=0)
    with pytest.raises(DataError, match="--max-seq-len 16"):
        build_general_loader(dataclasses.replace(_shard_cfg(shards[0]), max_seq_len=16), wordpiece, 2, 0, 1, seed=0)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in shards[0].iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    first_bin = sorted(broken.glob("*.bin"))[0]
    first_bin.write_bytes(first_bin.read_bytes()[:-4])
    with pytest.raises(DataError, match=re.escape(str(first_bin))):
        build_general_loader(_shard_cfg(broken), wordpiece, 2, 0, 1, seed=0)
    with pytest.raises(DataError, match="no meta.json"):
        build_general_loader(_shard_cfg(tmp_path / "sp"), wordpiece, 2, 0, 1, seed=0)


def test_failed_preprocess_leaves_no_output(corpus, wordpiece, wordpiece_dir, tmp_path, monkeypatch):
    def fail(self):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(indexed.ShardWriter, "close", fail)  # inherited by the forked workers
    cfg = DataConfig(corpus=str(corpus[0]), max_seq_len=SEQ)
    with pytest.raises(DataError, match="disk full"):
        preprocess(cfg, wordpiece, wordpiece_dir, tmp_path / "out", workers=2, progress=False)
    assert list(tmp_path.iterdir()) == [], "a failed run must leave neither output nor temporary folder"


def test_existing_output_needs_overwrite(corpus, wordpiece, wordpiece_dir, tmp_path):
    cfg = DataConfig(corpus=str(corpus[0]), max_seq_len=SEQ)
    out = tmp_path / "out"
    first = preprocess(cfg, wordpiece, wordpiece_dir, out, workers=1, progress=False)
    with pytest.raises(UserError, match=r"already holds this command's earlier output \(preprocessed_corpus\); "
                                        "pass --overwrite"):
        preprocess(cfg, wordpiece, wordpiece_dir, out, workers=1, progress=False)
    again = preprocess(dataclasses.replace(cfg, max_seq_len=64), wordpiece, wordpiece_dir, out, workers=3,
                       overwrite=True, progress=False)
    assert again["max_seq_len"] == 64 and again["tokens"] == first["tokens"] and len(again["shards"]) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, wordpiece_dir, in_process):
    pattern = str(tmp_path / "missing" / "*.txt")
    code, lines = in_process(["preprocess", "--input", pattern, "--tokenizer", wordpiece_dir,
                              "--output", str(tmp_path / "o")])
    assert code == 2
    assert lines == [f"error: data.corpus: {pattern!r} matches no file"]


def test_one_file_is_shared_by_all_workers(corpus, wordpiece, wordpiece_dir, tmp_path):
    """Fewer files than workers: each worker keeps every W-th document; none is lost or doubled."""
    single = tmp_path / "one.txt"
    single.write_text("".join(text + "\n" for text in corpus[1].values()))
    meta = preprocess(DataConfig(corpus=str(single), max_seq_len=SEQ, packing="document"), wordpiece, wordpiece_dir,
                      tmp_path / "out", workers=3, progress=False)
    assert [s["sequences"] > 0 for s in meta["shards"]] == [True] * 3
    assert meta["documents"] == len(corpus[1])
    assert decoded_counts(wordpiece, _all_sequences(tmp_path / "out")) == sentence_counts(corpus[1])


@pytest.mark.slow
def test_killed_preprocess_leaves_nothing_that_looks_complete(corpus, wordpiece, wordpiece_dir, tmp_path):
    import signal
    import time
    big = tmp_path / "big.txt"
    big.write_text("".join(text + "\n" for text in corpus[1].values()) * 200)  # seconds of work
    out = tmp_path / "out"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "ernie_tiny_ds.cli", "preprocess", "--input", str(big),
                             "--tokenizer", wordpiece_dir, "--output", str(out), "--workers", "2"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob(".out.tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its worker processes, mid-run
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert [p.name.rsplit("-", 1)[0] for p in tmp_path.glob(".out.tmp-*")] == [f".out.tmp-{proc.pid}"]
    # the next run removes the dead run's temporary folder and finishes
    meta = preprocess(DataConfig(corpus=str(big), max_seq_len=SEQ), wordpiece, wordpiece_dir, out, workers=2,
                      progress=False)
    assert meta["documents"] == 200 * len(corpus[1]) and (out / "meta.json").is_file()
    assert not list(tmp_path.glob(".out.tmp-*"))

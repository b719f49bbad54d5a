"""General-corpus batches: length grouping, padding to the longest row (rounded up to 8 for CUDA), and
data.packing: full (sequences filled across documents) -- with every sentence still once per epoch and
exact resume."""
from __future__ import annotations

import dataclasses
import random
import re
from collections import Counter

import numpy as np
import pytest
import torch
from corpus_fixtures import batch_sequences, sentence_counts, write_id_corpus
from test_loader import epochs, roundtrip, take

from ernie_tiny_ds.config import DataConfig
from ernie_tiny_ds.data.corpus import build_general_loader
from ernie_tiny_ds.data.packing import FullPacker, TokenEncoder, batch_from, collate
from ernie_tiny_ds.data.sharding import Consumer
from ernie_tiny_ds.data.sources import ReadStats, corpus_sources
from ernie_tiny_ds.data.stream import GROUP_BATCHES, SequenceStream, grouped_order
from ernie_tiny_ds.errors import DataError

_DOC_ID = re.compile(r"\bdoc(\d+)\b")


def config(corpus, **kw) -> DataConfig:
    return dataclasses.replace(DataConfig(corpus=str(corpus), max_seq_len=32, shuffle_buffer=24, packing="document"),
                               **kw)


def padded_share(batches) -> float:
    masks = [b["attention_mask"] for b in batches]
    return 1 - sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)


def sentences_seen(tokenizer, sequences) -> Counter:
    """doc id -> sentences, for sequences that may hold several documents ([SEP] between them)."""
    seen: Counter = Counter()
    for seq in sequences:
        assert seq[0] == tokenizer.cls_token_id and seq[-1] == tokenizer.sep_token_id
        for d in _DOC_ID.findall(tokenizer.decode(seq[1:-1])):
            seen[int(d)] += 1
    return seen


# --- the pieces --------------------------------------------------------------------------------------

def test_grouped_order_is_a_permutation_of_length_sorted_batches():
    rng = random.Random(0)
    lengths = [rng.randint(3, 128) for _ in range(1000)]
    for batch_size in (1, 4, 7):
        order = grouped_order(lengths, batch_size, random.Random(1))
        assert sorted(order) == list(range(len(lengths)))
        assert order == grouped_order(lengths, batch_size, random.Random(1))  # a function of the seed
    order = grouped_order(lengths, 8, random.Random(1))
    spreads = [np.ptp([lengths[i] for i in order[b:b + 8]]) for b in range(0, 992, 8)]
    assert np.mean(spreads) < 10  # a random batch of 8 from 3..128 spreads about 95
    # batches come in a shuffled order, not sorted by length
    firsts = [lengths[order[b]] for b in range(0, 992, 8)]
    assert firsts != sorted(firsts) and firsts != sorted(firsts, reverse=True)
    assert GROUP_BATCHES * 8 < len(lengths)  # more than one sorted chunk was exercised


def test_collate_pads_to_the_longest_row_rounded_up_to_8():
    batch = collate([[1] * 5, [1] * 17, [1] * 3], max_seq_len=64, pad_id=0)
    assert batch["input_ids"].shape == (3, 24)
    assert batch["attention_mask"].sum(1).tolist() == [5, 17, 3]
    assert collate([[1] * 30], max_seq_len=30, pad_id=0)["input_ids"].shape == (1, 30)  # never past max_seq_len
    assert collate([[1] * 5], max_seq_len=64, pad_id=0, multiple=None)["input_ids"].shape == (1, 64)


def test_shard_batches_are_cut_to_their_longest_row():
    ids = np.zeros((2, 128), dtype=np.int64)
    batch = batch_from(ids, np.array([9, 20]))
    assert batch["input_ids"].shape == (2, 24) and batch["input_ids"].is_contiguous()
    assert batch["attention_mask"].sum(1).tolist() == [9, 20]


def test_full_packer_fills_across_documents_with_sep_between(wordpiece):
    encoder = TokenEncoder(wordpiece)
    packer = FullPacker(encoder, 32)
    docs = ["doc1 the old ship.", "doc2 water city. doc2 old road.", "doc3 a very " + "long " * 40 + "line."]
    out = packer.add(docs, [True, True, True]) + packer.flush()
    cls, sep = wordpiece.cls_token_id, wordpiece.sep_token_id
    assert all(len(s) <= 32 and s[0] == cls and s[-1] == sep for s in out)
    # content in order: the documents' tokens, a [SEP] wherever one document follows another in a sequence
    content = [t for s in out for t in s[1:-1]]
    ids = encoder(docs)
    assert [t for t in content if t != sep] == [t for d in ids for t in d]
    assert out[0][1:-1] == ids[0] + [sep] + ids[1]  # two short documents share the first sequence
    assert len(ids[2]) > 30 and len(out) == 1 + -(-len(ids[2]) // 30)  # doc3: one sentence, cut into sequences
    # a piece that continues its document gets no [SEP]
    cont = FullPacker(encoder, 32)
    joined = cont.add(["doc4 one.", "doc4 two."], [True, False]) + cont.flush()
    assert joined == [[cls] + encoder(["doc4 one."])[0] + encoder(["doc4 two."])[0] + [sep]]


# --- the stream: exactly once, resume ------------------------------------------------------------------

@pytest.mark.parametrize("packing", ["document", "full"])
def test_every_sentence_once_per_epoch_over_ranks_and_workers(wordpiece, tmp_path, packing):
    docs = write_id_corpus(tmp_path / "corpus", documents=61, files=3)
    cfg = config(tmp_path / "corpus", packing=packing)
    srcs = corpus_sources(cfg, ReadStats())
    seen = Counter()
    for rank in (0, 1):
        for worker in (0, 1):
            stream = SequenceStream(srcs, cfg, wordpiece, Consumer(rank, 2, worker, 2), seed=5, batch_size=4)
            seen += sentences_seen(wordpiece, epochs(stream, 1)[0])
    assert seen == sentence_counts(docs)


def test_grouping_only_reorders_the_window(wordpiece, tmp_path):
    write_id_corpus(tmp_path / "corpus", documents=40, files=2)
    cfg = config(tmp_path / "corpus")
    srcs = corpus_sources(cfg, ReadStats())
    plain = SequenceStream(srcs, cfg, wordpiece, Consumer(0, 1, 0, 1), seed=3)
    grouped = SequenceStream(srcs, cfg, wordpiece, Consumer(0, 1, 0, 1), seed=3, batch_size=4)
    a, b = epochs(plain, 2), epochs(grouped, 2)
    assert [sorted(e) for e in a] == [sorted(e) for e in b] and a != b


def unrounded_share(batches) -> float:
    """The padded share with each batch exactly as wide as its longest row (rounding to 8 left out)."""
    masks = [b["attention_mask"] for b in batches]
    return 1 - sum(int(m.sum()) for m in masks) / sum(int(m.sum(1).max()) * len(m) for m in masks)


def test_grouped_batches_stay_aligned_when_windows_are_not_whole_batches(wordpiece, tmp_path, monkeypatch):
    """Windows of 100-odd sequences and batches of 8: each window's first rows complete the batch the
    window before left open, so its grouped batches are not shifted across two length groups."""
    from ernie_tiny_ds.data import stream as stream_module

    monkeypatch.setattr(stream_module, "GROUP_PIECES", 7)  # small tokenizer groups: many windows
    write_id_corpus(tmp_path / "corpus", documents=400, files=1, seed=2)
    cfg = config(tmp_path / "corpus", shuffle_buffer=100)
    stream = SequenceStream(corpus_sources(cfg, ReadStats()), cfg, wordpiece, Consumer(0, 1, 0, 1), seed=3,
                            batch_size=8)
    windows = []
    real = stream._set_window

    def counting(start, sequences, end, filled):
        windows.append((len(sequences), filled))
        return real(start, sequences, end, filled)

    stream._set_window = counting
    batches = [stream.next_batch() for _ in range(100)]
    assert sum(size % 8 != 0 for size, _ in windows) >= 4  # the case under test: windows end mid-batch
    assert all(filled == (windows[i][1] + windows[i][0]) % 8 for i, (_, filled) in enumerate(windows[1:]))
    assert unrounded_share(batches) < 0.08, unrounded_share(batches)  # 0.13 with every window shifted


def test_full_packing_and_grouping_pad_less(wordpiece, tmp_path):
    write_id_corpus(tmp_path / "corpus", documents=200, files=1)
    before = [collate(batch_sequences(b), 32, wordpiece.pad_token_id, multiple=None)  # the old fixed width
              for b in take(build_general_loader(config(tmp_path / "corpus"), wordpiece, 4, 0, 1, seed=1), 30)]
    grouped = take(build_general_loader(config(tmp_path / "corpus"), wordpiece, 4, 0, 1, seed=1), 30)
    full = take(build_general_loader(config(tmp_path / "corpus", packing="full"), wordpiece, 4, 0, 1, seed=1), 30)
    assert padded_share(grouped) < 0.5 * padded_share(before)
    assert padded_share(full) < padded_share(before) and padded_share(full) < 0.2
    for batch in grouped + full:  # bound for the CPU (the default): exactly as wide as the longest row
        assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(1).max())


@pytest.mark.parametrize("packing,workers", [("document", 0), ("full", 2)])
def test_batch_widths_round_up_to_8_only_for_cuda(wordpiece, tmp_path, packing, workers):
    """Rounding to 8 pays on CUDA (tensor cores) and is pure padding on a CPU; the sequences are the same."""
    write_id_corpus(tmp_path / "corpus", documents=200, files=1)
    cfg = config(tmp_path / "corpus", packing=packing, num_workers=workers)
    on = {dev: take(build_general_loader(cfg, wordpiece, 4, 0, 1, seed=1, device=dev), 30)
          for dev in ("cpu", torch.device("cuda", 0))}
    assert batch_sequences_of(on["cpu"]) == batch_sequences_of(on[torch.device("cuda", 0)])
    widths = {dev: [(b["input_ids"].shape[1], int(b["attention_mask"].sum(1).max())) for b in batches]
              for dev, batches in on.items()}
    assert all(width == longest for width, longest in widths["cpu"])
    assert all(width % 8 == 0 and width - 8 < longest <= width for width, longest in widths[torch.device("cuda", 0)])
    assert sum(w for w, _ in widths["cpu"]) < sum(w for w, _ in widths[torch.device("cuda", 0)])
    assert padded_share(on["cpu"]) < padded_share(on[torch.device("cuda", 0)])


def batch_sequences_of(batches) -> list:
    return [batch_sequences(b) for b in batches]


@pytest.mark.parametrize("packing,workers,device", [("document", 0, "cpu"), ("full", 0, "cpu"), ("full", 2, "cuda")])
def test_restart_continues_with_the_same_batches(wordpiece, tmp_path, packing, workers, device):
    write_id_corpus(tmp_path / "corpus", documents=30, files=1, seed=3)
    cfg = config(tmp_path / "corpus", packing=packing, num_workers=workers, shuffle_buffer=8)
    total = 24  # several windows and more than one epoch per rank
    straight = take(build_general_loader(cfg, wordpiece, 3, 1, 2, seed=11, device=device), total)
    for stop in (5, 17):
        first = build_general_loader(cfg, wordpiece, 3, 1, 2, seed=11, device=device)
        it = iter(first)
        for _ in range(stop):
            next(it)
        state = roundtrip(first.state_dict())
        it.close()
        resumed = build_general_loader(cfg, wordpiece, 3, 1, 2, seed=11, device=device)
        resumed.load_state_dict(state)
        for expected, got in zip(straight[stop:], take(resumed, total - stop), strict=True):
            for key in ("input_ids", "attention_mask", "token_type_ids"):
                assert torch.equal(expected[key], got[key]), f"batch differs after resuming at {stop}"


def test_state_from_another_packing_or_batch_size_is_refused(wordpiece, tmp_path):
    write_id_corpus(tmp_path / "corpus", documents=10, files=2)
    state = build_general_loader(config(tmp_path / "corpus"), wordpiece, 2, 0, 1, seed=1).state_dict()
    with pytest.raises(DataError, match="packing=document"):
        build_general_loader(config(tmp_path / "corpus", packing="full"), wordpiece, 2, 0, 1,
                             seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="batch_size=2"):
        build_general_loader(config(tmp_path / "corpus"), wordpiece, 4, 0, 1, seed=1).load_state_dict(state)


def test_preprocess_full_packing_keeps_every_sentence_once(wordpiece, wordpiece_dir, tmp_path):
    from test_preprocess import _all_sequences

    from ernie_tiny_ds.data.preprocess import preprocess

    docs = write_id_corpus(tmp_path / "corpus", documents=50, files=1, seed=2)
    meta = preprocess(DataConfig(corpus=str(tmp_path / "corpus"), max_seq_len=32, packing="full"), wordpiece,
                      wordpiece_dir, tmp_path / "out", workers=2, progress=False)
    sequences = _all_sequences(tmp_path / "out")
    assert meta["packing"] == "full" and sentences_seen(wordpiece, sequences) == sentence_counts(docs)
    tokens = sum(len(wordpiece(t, add_special_tokens=False)["input_ids"]) for t in docs.values())
    assert meta["tokens"] == tokens and all(len(s) <= 32 for s in sequences)
    mixed = [s for s in sequences if s[1:-1].count(wordpiece.sep_token_id)]
    by_document = preprocess(DataConfig(corpus=str(tmp_path / "corpus"), max_seq_len=32, packing="document"), wordpiece,
                             wordpiece_dir, tmp_path / "doc", workers=2, progress=False)
    assert mixed and len(sequences) < 0.9 * by_document["sequences"]  # documents share sequences


def test_padding_share_is_logged_as_a_rate_not_a_loss(tmp_path, capsys):
    import json

    from ernie_tiny_ds.runtime.metrics import RATE_FIELDS, MetricsLogger

    batch = collate([[1] * 5, [1] * 17], max_seq_len=64, pad_id=0)  # 22 of 48 positions are content
    share = round(1 - int(batch["attention_mask"].sum()) / batch["attention_mask"].numel(), 4)
    logger = MetricsLogger(tmp_path, 0, 1, 0, "General Distillation", progress_bar=False, log_every=1)
    logger.step(1, {"loss": 1.0, "padding": share}, tokens=22)
    logger.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert "padding" in RATE_FIELDS and row["padding"] == pytest.approx(26 / 48, abs=1e-4)
    assert "54.2% padding" in capsys.readouterr().out


def test_default_general_batches_pad_at_most_5_percent_at_the_demo_shapes(tokenizer_dir):
    """The default packing (full) on the bundled corpus, 16 x 64 in windows of 256 as the demo reads it."""
    from ernie_tiny_ds.data.tokenizer import load_tokenizer

    cfg = DataConfig(max_seq_len=64, shuffle_buffer=256)
    batches = take(build_general_loader(cfg, load_tokenizer(tokenizer_dir), 16, 0, 2, seed=1), 60)
    assert cfg.packing == "full" and padded_share(batches) <= 0.05, padded_share(batches)

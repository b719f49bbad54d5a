"""Documents -> token sequences [CLS] ... [SEP] of at most max_seq_len, and sequences -> padded batches.

Packing keeps the sentences of one document together: consecutive sentences fill a sequence until
the next one does not fit; a sentence longer than a sequence is cut. With data.packing: document
(pack_pieces) sequences never mix documents; with data.packing: full (FullPacker, RoBERTa's
FULL-SENTENCES) whole sentences fill each sequence across document boundaries, with a [SEP] between
two documents, so only the last sequence of a window is short.
Each document is tokenized whole (one string per document in the batched call: faster than one per
sentence) and a sentence ends after a sentence-final punctuation token (. ! ? and CJK forms).
Very long documents are first cut into pieces of at most PIECE_CHARS characters (at whitespace),
so a 10 MB line is tokenized piece by piece instead of in one call; each piece packs on its own.
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch

PIECE_CHARS = 32_768
PAD_MULTIPLE = 8  # batch widths on CUDA: tensor cores want multiples of 8, and few distinct shapes
_SENTENCE_FINAL = set(".!?\u3002\uff01\uff1f")


def pieces_of(text: str, limit: int = PIECE_CHARS) -> list[str]:
    """`text` cut into pieces of at most `limit` characters, at the last whitespace before the limit."""
    if len(text) <= limit:
        return [text]
    pieces, start = [], 0
    while len(text) - start > limit:
        cut = text.rfind(" ", start + limit // 2, start + limit)
        cut = start + limit if cut < 0 else cut
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return [p.strip() for p in pieces if p.strip()]


class TokenEncoder:
    """Batched content-token ids of a Hugging Face fast tokenizer, straight from its Rust backend.

    `tokenizer(texts)` computes offsets and wraps every encoding in Python objects; the backend's
    encode_batch_fast skips both (about 2x faster here) and gives the same ids. The backend is a copy
    with truncation and padding switched off, as `tokenizer(texts)` without those options has them.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = None
        if backend is not None and hasattr(backend, "encode_batch_fast"):
            from tokenizers import Tokenizer
            self._backend = Tokenizer.from_str(backend.to_str())
            self._backend.no_truncation()
            self._backend.no_padding()

    @functools.cached_property
    def sentence_ends(self) -> frozenset[int]:
        """Built on first use: a scan of the vocabulary that counting tokens (lengths) does not need."""
        return sentence_final_ids(self.tokenizer)

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if self._backend is None:
            return self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                                  return_token_type_ids=False, verbose=False)["input_ids"]
        return [e.ids for e in self._backend.encode_batch_fast(texts, add_special_tokens=False)]

    def lengths(self, texts: list[str]) -> list[int]:
        """The number of content tokens of each text (no ids turned into Python lists)."""
        if self._backend is None:
            return [len(ids) for ids in self(texts)]
        return [len(e) for e in self._backend.encode_batch_fast(texts, add_special_tokens=False)]


def sentence_final_ids(tokenizer) -> frozenset[int]:
    """Ids of vocabulary entries that are only sentence-final punctuation (also as ##. or \u2581. pieces)."""
    ends = set()
    for token, index in tokenizer.get_vocab().items():
        text = token.removeprefix("##").lstrip("\u2581")
        if text and set(text) <= _SENTENCE_FINAL:
            ends.add(index)
    return frozenset(ends)


def sentence_bounds(ids: list[int], ends: frozenset[int]) -> list[int]:
    """The end index of each sentence of `ids` (the last one ends at len(ids))."""
    bounds = [i + 1 for i, token in enumerate(ids) if token in ends]
    if not bounds or bounds[-1] != len(ids):
        bounds.append(len(ids))
    return bounds


def pack_ids(ids: list[int], ends: frozenset[int], room: int) -> list[list[int]]:
    """Greedy over sentences: ids[start:end] is the sequence being filled, ids[end:bound] the next sentence."""
    out: list[list[int]] = []
    bounds = sentence_bounds(ids, ends)
    start = end = 0
    for bound in bounds:
        if bound - start <= room:
            end = bound
            continue
        if end > start:
            out.append(ids[start:end])
            start = end
        while bound - start > room:  # a sentence longer than a sequence
            out.append(ids[start:start + room])
            start += room
        end = bound
    if end > start:
        out.append(ids[start:end])
    return out


def pack_pieces(pieces: list[str], encoder: TokenEncoder, max_seq_len: int) -> list[list[list[int]]]:
    """For each piece (a document or part of one), its sequences with [CLS] and [SEP]."""
    cls, sep, room = [encoder.tokenizer.cls_token_id], [encoder.tokenizer.sep_token_id], max_seq_len - 2
    return [[cls + seq + sep for seq in pack_ids(ids, encoder.sentence_ends, room)] for ids in encoder(pieces)]


class FullPacker:
    """data.packing: full. Whole sentences fill [CLS] ... [SEP] sequences across documents, a [SEP]
    closing each document that is followed by another in the same sequence; a sentence longer than
    a sequence is cut. Feed it pieces in stream order; flush() hands out the sequence being filled."""

    def __init__(self, encoder: TokenEncoder, max_seq_len: int):
        self.encoder, self.room = encoder, max_seq_len - 2
        self.cls, self.sep = encoder.tokenizer.cls_token_id, encoder.tokenizer.sep_token_id
        self._current: list[int] = []

    def add(self, pieces: list[str], new_document: list[bool]) -> list[list[int]]:
        """The sequences completed by `pieces`; new_document[i]: piece i starts a document (else it
        continues the previous piece's document, as the parts of a very long line do)."""
        out: list[list[int]] = []
        for ids, new in zip(self.encoder(pieces), new_document):
            start = 0
            for bound in sentence_bounds(ids, self.encoder.sentence_ends):
                sentence = ids[start:bound]
                start = bound
                if not sentence:
                    continue
                joint = [self.sep] if new and self._current else []
                if len(self._current) + len(joint) + len(sentence) <= self.room:
                    self._current += joint + sentence
                else:
                    out += self.flush()
                    while len(sentence) > self.room:  # a sentence longer than a sequence
                        out.append([self.cls] + sentence[:self.room] + [self.sep])
                        sentence = sentence[self.room:]
                    self._current = list(sentence)
                new = False
        return out

    def flush(self) -> list[list[int]]:
        out = [[self.cls] + self._current + [self.sep]] if self._current else []
        self._current = []
        return out


def pad_multiple_for(device) -> int:
    """What general-corpus batch widths round up to for batches bound for `device`: PAD_MULTIPLE on
    CUDA, where tensor-core matmuls and fused attention want it and a shape seen before avoids a new
    kernel choice; 1 elsewhere, since a CPU does the same work per column and every padded one is waste
    (the rounding alone was ~5 points of padding at the demo's shapes, BENCHMARKS.md §6)."""
    return PAD_MULTIPLE if torch.device(device).type == "cuda" else 1


def batch_width(longest: int, max_seq_len: int, multiple: int | None = PAD_MULTIPLE) -> int:
    """The batch's longest sequence rounded up to `multiple` (never past max_seq_len); None: max_seq_len."""
    return max_seq_len if multiple is None else min(max_seq_len, -(-longest // multiple) * multiple)


def collate(sequences: Sequence[Sequence[int]], max_seq_len: int, pad_id: int,
            multiple: int | None = PAD_MULTIPLE) -> dict[str, torch.Tensor]:
    """[B, W] int64 input_ids / attention_mask / token_type_ids, padding at the end only, W = the longest
    sequence rounded up to `multiple` (None: W = max_seq_len, the old fixed width)."""
    width = batch_width(max(map(len, sequences)), max_seq_len, multiple)
    input_ids = np.full((len(sequences), width), pad_id, dtype=np.int64)
    lengths = np.empty(len(sequences), dtype=np.int64)
    for row, seq in enumerate(sequences):
        input_ids[row, :len(seq)] = seq
        lengths[row] = len(seq)
    return batch_from(input_ids, lengths, multiple)


def batch_from(input_ids: np.ndarray, lengths: np.ndarray,
               multiple: int | None = PAD_MULTIPLE) -> dict[str, torch.Tensor]:
    """The model inputs of right-padded [B, L] int64 ids whose rows hold `lengths` tokens, cut to the
    longest row rounded up to `multiple` (the shard reader gathers into a full-width buffer)."""
    width = batch_width(int(lengths.max(initial=1)), input_ids.shape[1], multiple)
    if width < input_ids.shape[1]:
        input_ids = np.ascontiguousarray(input_ids[:, :width])
    attention_mask = (np.arange(input_ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask),
            "token_type_ids": torch.zeros(input_ids.shape, dtype=torch.long)}

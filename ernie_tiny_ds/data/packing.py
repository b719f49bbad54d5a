"""Documents -> token sequences [CLS] ... [SEP] of at most max_seq_len, and sequences -> padded batches.

Packing keeps the sentences of one document together: consecutive sentences fill a sequence until
the next one does not fit; a sentence longer than a sequence is cut. Sequences never mix documents.
Each document is tokenized whole (one string per document in the batched call: faster than one per
sentence) and a sentence ends after a sentence-final punctuation token (. ! ? and CJK forms).
Very long documents are first cut into pieces of at most PIECE_CHARS characters (at whitespace),
so a 10 MB line is tokenized piece by piece instead of in one call; each piece packs on its own.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

PIECE_CHARS = 32_768
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
        self.sentence_ends = sentence_final_ids(tokenizer)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = None
        if backend is not None and hasattr(backend, "encode_batch_fast"):
            from tokenizers import Tokenizer
            self._backend = Tokenizer.from_str(backend.to_str())
            self._backend.no_truncation()
            self._backend.no_padding()

    def __call__(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if self._backend is None:
            return self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                                  return_token_type_ids=False, verbose=False)["input_ids"]
        return [e.ids for e in self._backend.encode_batch_fast(texts, add_special_tokens=False)]


def sentence_final_ids(tokenizer) -> frozenset[int]:
    """Ids of vocabulary entries that are only sentence-final punctuation (also as ##. or \u2581. pieces)."""
    ends = set()
    for token, index in tokenizer.get_vocab().items():
        text = token.removeprefix("##").lstrip("\u2581")
        if text and set(text) <= _SENTENCE_FINAL:
            ends.add(index)
    return frozenset(ends)


def pack_ids(ids: list[int], ends: frozenset[int], room: int) -> list[list[int]]:
    """Greedy over sentences: ids[start:end] is the sequence being filled, ids[end:bound] the next sentence."""
    out: list[list[int]] = []
    bounds = [i + 1 for i, token in enumerate(ids) if token in ends]
    if not bounds or bounds[-1] != len(ids):
        bounds.append(len(ids))
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


def collate(sequences: Sequence[Sequence[int]], max_seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """[B, L] int64 input_ids / attention_mask / token_type_ids, padding at the end only."""
    input_ids = np.full((len(sequences), max_seq_len), pad_id, dtype=np.int64)
    lengths = np.empty(len(sequences), dtype=np.int64)
    for row, seq in enumerate(sequences):
        input_ids[row, :len(seq)] = seq
        lengths[row] = len(seq)
    return batch_from(input_ids, lengths)


def batch_from(input_ids: np.ndarray, lengths: np.ndarray) -> dict[str, torch.Tensor]:
    """The model inputs of right-padded [B, L] int64 ids whose rows hold `lengths` tokens."""
    attention_mask = (np.arange(input_ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask),
            "token_type_ids": torch.zeros(input_ids.shape, dtype=torch.long)}

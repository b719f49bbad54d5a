"""Plain streaming reader of a general corpus: text files, one document per line.

The loader contract (what the training loop relies on):
  * iterating yields endless batches {input_ids, attention_mask, token_type_ids} of [B, L] int64,
    epoch after epoch;
  * each rank sees a disjoint share of the documents;
  * state_dict() / load_state_dict() restore the exact position, so a restarted run continues
    with the batch it would have seen next.
"""
from __future__ import annotations

import glob
import os
from typing import Iterator

import torch

from ..errors import DataError


def resolve_files(pattern: str) -> list[str]:
    """A file, a folder (every file in it) or a glob, sorted for a deterministic order."""
    if os.path.isdir(pattern):
        files = [os.path.join(pattern, f) for f in os.listdir(pattern)]
        files = [f for f in files if os.path.isfile(f) and not os.path.basename(f).startswith(".")]
    elif os.path.isfile(pattern):
        files = [pattern]
    else:
        files = [f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f)]
    if not files:
        raise DataError(f"data.corpus: {pattern!r} matches no file")
    return sorted(files)


class PlainTextCorpusLoader:
    def __init__(self, files: list[str], tokenizer, max_seq_len: int, batch_size: int,
                 rank: int = 0, world_size: int = 1):
        self.files = files
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self._epoch = 0
        self._batches_in_epoch = 0  # batches already handed out in the current epoch

    def _documents(self) -> Iterator[str]:
        index = 0
        for path in self.files:
            with open(path, encoding="utf-8", errors="replace") as handle:
                for line in handle:
                    text = line.strip()
                    if not text:
                        continue
                    if index % self.world_size == self.rank:
                        yield text
                    index += 1

    def _sequences(self) -> Iterator[list[int]]:
        room = self.max_seq_len - 2
        for text in self._documents():
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            for start in range(0, len(ids), room):
                yield [self.tokenizer.cls_token_id, *ids[start:start + room], self.tokenizer.sep_token_id]

    def _collate(self, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
        input_ids = torch.full((len(sequences), self.max_seq_len), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, seq in enumerate(sequences):
            input_ids[row, :len(seq)] = torch.tensor(seq)
            attention_mask[row, :len(seq)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "token_type_ids": torch.zeros_like(input_ids)}

    def _epoch_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        pending: list[list[int]] = []
        for seq in self._sequences():
            pending.append(seq)
            if len(pending) == self.batch_size:
                yield self._collate(pending)
                pending = []

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            produced = 0
            for batch in self._epoch_batches():
                produced += 1
                if produced <= self._batches_in_epoch:
                    continue  # replaying up to the saved position
                self._batches_in_epoch = produced
                yield batch
            if produced == 0:
                raise DataError(f"data.corpus: rank {self.rank} got no full batch of {self.batch_size} sequences "
                                f"from {len(self.files)} file(s); use more text or a smaller batch")
            self._epoch += 1
            self._batches_in_epoch = 0

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "batches_in_epoch": self._batches_in_epoch,
                "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("world_size") != self.world_size:
            raise DataError(f"the checkpoint's data position was saved with {state.get('world_size')} ranks, "
                            f"this run has {self.world_size}")
        self._epoch = int(state["epoch"])
        self._batches_in_epoch = int(state["batches_in_epoch"])


def build_general_loader(data_cfg, tokenizer, batch_size: int, rank: int, world_size: int, seed: int):
    """The general-corpus loader named by the recipe's data section."""
    pattern = data_cfg.corpus
    if pattern is None:
        from ..assets import DEFAULT_CORPUS_GLOB
        pattern = DEFAULT_CORPUS_GLOB
    return PlainTextCorpusLoader(resolve_files(pattern), tokenizer, data_cfg.max_seq_len, batch_size, rank, world_size)

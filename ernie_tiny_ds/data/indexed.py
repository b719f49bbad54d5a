"""Pre-tokenized token shards: a writer, and a memory-mapped reader with the loader contract.

A shard folder (written by `ernie-tiny-ds preprocess`) holds, per shard k,
  shard-k.bin  every sequence's token ids ([CLS] ... [SEP], no padding), back to back (meta dtype)
  shard-k.idx  int64 offsets into .bin: sequence i is tokens[idx[i]:idx[i+1]]
and meta.json (counts, dtype, tokenizer ids, shard list), written last.
The reader shuffles all sequences with a permutation seeded by (seed, epoch), evaluated where it is
needed rather than stored (permutation.py), and gives rank r every world_size-th one: each sequence
once per epoch, a new order each epoch, and a position that is two integers (epoch, sequences taken).
"""
from __future__ import annotations

import json
import mmap
import os
from array import array
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from .contract import check_state, loader_state
from .packing import batch_from
from .permutation import Permutation

META = "meta.json"
FORMAT_VERSION = 1
ORDER_BLOCK = 8192  # share slots whose sequence numbers are computed together (64 KiB)
ORDER = "feistel-6"  # how an epoch's order is drawn: a saved position only means something under the same one


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65536 else "int32"


class ShardWriter:
    """Appends sequences to shard-k.bin / shard-k.idx, flushing every ~1M tokens."""

    def __init__(self, folder: Path, index: int, dtype: str):
        self.name = f"shard-{index:05d}"
        self._bin = open(folder / f"{self.name}.bin", "wb")
        self._idx = open(folder / f"{self.name}.idx", "wb")
        self._code = {"uint16": "H", "int32": "i"}[dtype]
        self._tokens, self._offsets = array(self._code), array("q", [0])
        self.sequences = self.tokens = 0   # tokens: all written ids, [CLS]/[SEP] included

    def add(self, sequence: list[int]) -> None:
        self._tokens.extend(sequence)
        self.tokens += len(sequence)
        self.sequences += 1
        self._offsets.append(self.tokens)
        if len(self._tokens) >= 1 << 20:
            self._flush()

    def _flush(self) -> None:
        self._tokens.tofile(self._bin)
        self._offsets.tofile(self._idx)
        self._tokens, self._offsets = array(self._code), array("q")

    def close(self) -> dict:
        self._flush()
        for handle in (self._bin, self._idx):
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        return {"name": self.name, "sequences": self.sequences, "tokens": self.tokens}


def _map(path: Path, dtype: str) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    with open(path, "rb") as handle:
        return np.frombuffer(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ), dtype=dtype)


def read_meta(folder: str) -> dict:
    path = Path(folder) / META
    if not Path(folder).is_dir():
        raise DataError(f"data.corpus: shard folder not found: {folder}")
    if not path.is_file():
        raise DataError(f"data.corpus: {folder} has no {META}: not a finished `ernie-tiny-ds preprocess` output")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path}: shard format {meta.get('format_version')}, this version reads {FORMAT_VERSION}")
    return meta


class TokenShards:
    """All shards of a folder as one indexable list of sequences (memory-mapped, nothing loaded)."""

    def __init__(self, folder: str):
        self.meta = read_meta(folder)
        self.tokens, self.offsets, self.starts = [], [], [0]
        for shard in self.meta["shards"]:
            bin_path, idx_path = Path(folder) / f"{shard['name']}.bin", Path(folder) / f"{shard['name']}.idx"
            for p in (bin_path, idx_path):
                if not p.is_file():
                    raise DataError(f"data.corpus: {p} is missing (listed in {META})")
            tokens, offsets = _map(bin_path, self.meta["dtype"]), _map(idx_path, "int64")
            if len(offsets) != shard["sequences"] + 1 or len(tokens) != shard["tokens"] or \
                    (len(offsets) and offsets[-1] != len(tokens)):
                raise DataError(f"data.corpus: {bin_path} / .idx do not match the counts in {META}: truncated or "
                                f"overwritten; run preprocess again")
            self.tokens.append(tokens)
            self.offsets.append(offsets)
            self.starts.append(self.starts[-1] + shard["sequences"])
        self._starts = np.asarray(self.starts, dtype=np.int64)

    def __len__(self) -> int:
        return self.starts[-1]

    def gather(self, indices: np.ndarray, out: np.ndarray, pad_id: int) -> np.ndarray:
        """Copy sequences `indices` into the rows of `out`, padded with `pad_id`; return their lengths.

        Where each sequence lies is computed for the whole batch at once; the copies are one slice
        assignment per row (faster here than one fancy-indexed gather of [rows, max_seq_len])."""
        shard_of = np.searchsorted(self._starts, indices, side="right") - 1
        local = indices - self._starts[shard_of]
        begins = np.empty(len(indices), dtype=np.int64)
        ends = np.empty(len(indices), dtype=np.int64)
        for shard in (np.unique(shard_of) if len(self.tokens) > 1 else (0,)):
            rows = shard_of == shard
            begins[rows] = self.offsets[shard][local[rows]]
            ends[rows] = self.offsets[shard][local[rows] + 1]
        out.fill(pad_id)
        tokens = self.tokens
        for row, (shard, begin, end) in enumerate(zip(shard_of.tolist(), begins.tolist(), ends.tolist())):
            out[row, :end - begin] = tokens[shard][begin:end]
        return ends - begins


def tokenizer_identity(tokenizer) -> dict:
    """What shards and the loader reading them must agree on (written to meta.json by preprocess)."""
    return {"vocab_size": len(tokenizer), "cls_token_id": tokenizer.cls_token_id,
            "sep_token_id": tokenizer.sep_token_id, "pad_token_id": tokenizer.pad_token_id}


class ShardLoader:
    def __init__(self, folder: str, tokenizer, batch_size: int, rank: int, world_size: int, seed: int,
                 max_seq_len: int, *, pad_multiple: int = 1):
        self.shards = TokenShards(folder)
        meta = self.shards.meta
        if meta["max_seq_len"] > max_seq_len:
            raise DataError(f"data.max_seq_len={max_seq_len} but the shards in {folder} hold sequences of up to "
                            f"{meta['max_seq_len']} tokens; preprocess again with --max-seq-len {max_seq_len}")
        ours = tokenizer_identity(tokenizer)
        theirs = {k: meta["tokenizer"][k] for k in ours}
        if theirs != ours:
            raise DataError(f"data.tokenizer does not match the one the shards in {folder} were made with "
                            f"({meta['tokenizer'].get('path')}): {theirs} vs {ours}")
        if len(self.shards) < world_size:
            raise DataError(f"data.corpus: {folder} holds {len(self.shards)} sequence(s), fewer than the "
                            f"{world_size} ranks")
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.max_seq_len, self.pad_id = max_seq_len, tokenizer.pad_token_id
        self.pad_multiple = pad_multiple   # batch widths round up to it (packing.pad_multiple_for)
        self.epoch, self.taken = 0, 0
        # this rank's share of an epoch: positions rank, rank + world_size, ... of that epoch's order
        self.share_size = (len(self.shards) - rank + world_size - 1) // world_size
        self._block_key, self._block = (-1, -1), np.zeros(0, dtype=np.int64)

    def _share_block(self, epoch: int, block: int) -> np.ndarray:
        """Sequence numbers of share slots [block * ORDER_BLOCK, +ORDER_BLOCK) of `epoch`, computed in
        one call: point-wise per batch, numpy's per-call overhead would cost more than reading the tokens."""
        if self._block_key != (epoch, block):
            slots = np.arange(block * ORDER_BLOCK, min((block + 1) * ORDER_BLOCK, self.share_size), dtype=np.int64)
            order = Permutation(len(self.shards), [self.seed, epoch])
            self._block_key, self._block = (epoch, block), order(self.rank + self.world_size * slots)
        return self._block

    def _next_indices(self) -> np.ndarray:
        """The next batch_size sequence numbers of this rank's share, crossing into the next epoch."""
        parts, wanted = [], self.batch_size
        while wanted:
            if self.taken == self.share_size:
                self.epoch, self.taken = self.epoch + 1, 0
            block, offset = divmod(self.taken, ORDER_BLOCK)
            part = self._share_block(self.epoch, block)[offset:offset + wanted]
            parts.append(part)
            self.taken += len(part)
            wanted -= len(part)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def next_batch(self) -> dict[str, torch.Tensor]:
        input_ids = np.empty((self.batch_size, self.max_seq_len), dtype=np.int64)
        lengths = self.shards.gather(self._next_indices(), input_ids, self.pad_id)
        return batch_from(input_ids, lengths, self.pad_multiple)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return loader_state("shards", rank=self.rank, world_size=self.world_size, seed=self.seed,
                            sequences=len(self.shards), order=ORDER, epoch=self.epoch, taken=self.taken)

    def load_state_dict(self, state: dict) -> None:
        check_state(state, "shards", world_size=self.world_size, seed=self.seed, rank=self.rank,
                    sequences=len(self.shards), order=ORDER)
        self.epoch, self.taken = int(state["epoch"]), int(state["taken"])

"""The general-corpus loader (stages 1-2): streaming from text sources, or from pre-tokenized shards.
Both keep the loader contract of data.contract (endless batches, disjoint shares, exact resume).

With data.num_workers = W > 0 the rank's share is split again over W torch DataLoader workers, each
a SequenceStream that yields whole batches. The DataLoader asks its workers in a fixed round-robin
order, and each batch carries its worker's state, so the main process always knows every worker's
position. On resume the workers are rotated so that the worker whose turn came next goes first.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import DataError, UserError
from .contract import check_state, loader_state
from .indexed import ShardLoader
from .sharding import Consumer
from .sources import ReadStats, corpus_sources
from .stream import SequenceStream

class _WorkerBatches(IterableDataset):
    """Runs inside a DataLoader worker: the endless batches of one SequenceStream, state attached."""

    def __init__(self, loader: "StreamingCorpusLoader", states: list, rotation: int):
        self.loader, self.states, self.rotation = loader, states, rotation

    def __iter__(self):
        info = get_worker_info()
        worker = (info.id + self.rotation) % info.num_workers
        stream = self.loader._stream(worker)
        if self.states[worker] is not None:
            stream.load_state_dict(self.states[worker])
        while True:
            try:
                batch = stream.next_batch(self.loader.batch_size)
            except UserError as exc:  # hand it to the main process as one clean line
                yield {"_error": str(exc), "_worker": worker}
                return
            batch["_worker"] = worker
            batch["_state"] = stream.state_dict()
            yield batch


class StreamingCorpusLoader:
    def __init__(self, data_cfg, tokenizer, batch_size: int, rank: int, world_size: int, seed: int):
        self.cfg, self.tokenizer, self.batch_size = data_cfg, tokenizer, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.num_workers = data_cfg.num_workers
        self.stats = ReadStats()
        self.sources = corpus_sources(data_cfg, self.stats)
        workers = max(1, self.num_workers)
        self._states: list = [None] * workers   # per worker: SequenceStream state, None = start
        self._next_worker = 0
        self._inline = self._stream(0) if self.num_workers == 0 else None

    def _stream(self, worker: int) -> SequenceStream:
        consumer = Consumer(self.rank, self.world_size, worker, max(1, self.num_workers))
        return SequenceStream(self.sources, self.cfg, self.tokenizer, consumer, self.seed, self.stats)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._inline is not None:
            while True:
                yield self._inline.next_batch(self.batch_size)
        dataset = _WorkerBatches(self, list(self._states), self._next_worker)
        for batch in DataLoader(dataset, batch_size=None, num_workers=self.num_workers, prefetch_factor=2):
            worker = batch.pop("_worker")
            if "_error" in batch:
                raise DataError(batch["_error"])
            self._states[worker] = batch.pop("_state")
            self._next_worker = (worker + 1) % self.num_workers
            yield batch

    def state_dict(self) -> dict:
        streams = [self._inline.state_dict()] if self._inline is not None else list(self._states)
        return loader_state("streaming", rank=self.rank, world_size=self.world_size, num_workers=self.num_workers,
                            seed=self.seed, next_worker=self._next_worker, streams=streams)

    def load_state_dict(self, state: dict) -> None:
        check_state(state, "streaming", world_size=self.world_size, seed=self.seed, rank=self.rank,
                    num_workers=self.num_workers)
        if self._inline is not None:
            self._inline.load_state_dict(state["streams"][0])
        else:
            self._states = list(state["streams"])
            self._next_worker = int(state["next_worker"])


def build_general_loader(data_cfg, tokenizer, batch_size: int, rank: int, world_size: int, seed: int):
    """The general-corpus loader named by the recipe's data section."""
    if data_cfg.source == "shards":
        if data_cfg.corpus is None:
            raise DataError("data.corpus: data.source=shards needs the folder written by `ernie-tiny-ds preprocess`")
        return ShardLoader(data_cfg.corpus, tokenizer, batch_size, rank, world_size, seed, data_cfg.max_seq_len)
    return StreamingCorpusLoader(data_cfg, tokenizer, batch_size, rank, world_size, seed)

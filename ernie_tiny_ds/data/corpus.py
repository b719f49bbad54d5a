"""The general-corpus loader (stages 1-2): streaming from text sources, or from pre-tokenized shards.
Both keep the loader contract of data.contract (endless batches, disjoint shares, exact resume).

With data.num_workers = W > 0 the rank's share is split again over W torch DataLoader workers, each
a SequenceStream that yields whole batches. The DataLoader asks its workers in a fixed round-robin
order, and each batch carries its worker's state, so the main process always knows every worker's
position. On resume the workers are rotated so that the worker whose turn came next goes first.
"""
from __future__ import annotations

import os
import re
import signal
import time
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import DataError, UserError
from .contract import check_state, loader_state
from .indexed import ShardLoader
from .packing import pad_multiple_for
from .sharding import Consumer
from .sources import ReadStats, corpus_sources
from .stream import SequenceStream
from .workers import Loading

# A worker that gives no batch for this long is reported (a hung filesystem read, a stopped process)
# instead of blocking the rank until the collective timeout ends the job without a word of why.
WORKER_TIMEOUT_S = float(os.environ.get("ERNIE_TINY_DS_WORKER_TIMEOUT_S", "600"))


def describe_worker_failure(exc: BaseException, rank: int | str | None = None) -> str | None:
    """One line for a DataLoader worker that hung or died, None for any other error. torch names
    neither cause; its SIGCHLD handler can raise the death anywhere in the main thread, so the CLI
    asks this too."""
    text = str(exc)
    who = "a DataLoader worker" + (f" of rank {rank}" if rank is not None else "")
    if "DataLoader timed out after" in text:
        return (f"data.num_workers: {who} gave no batch for {WORKER_TIMEOUT_S:g} s (stuck reading the corpus, or "
                "stopped); check the corpus's filesystem, or set data.num_workers=0 to read in the training process")
    match = re.search(r"DataLoader worker \(pids?\(?s?\)? ([\d, ]+)\) "
                      r"(is killed by signal: ([^.]+)|exited unexpectedly)", text)
    if match is None:
        return None
    how = f"killed by signal {match.group(3)}" if match.group(3) else "it exited unexpectedly"
    likely = ", most likely the out-of-memory killer" if match.group(3) in (None, "Killed") else ""
    return (f"data.num_workers: {who} (pid {match.group(1).strip()}) ended ({how}{likely}); lower "
            "data.num_workers or data.shuffle_buffer, or give the job more host memory")


def dead_worker_line(batches, rank: int) -> str | None:
    """The same line from a DataLoader iterator whose worker process has ended abnormally."""
    time.sleep(0.5)  # the dying worker may not have been reaped yet
    for worker in getattr(batches, "_workers", []):
        code = worker.exitcode
        if code is None or code == 0:
            continue
        text = (f"DataLoader worker (pid {worker.pid}) is killed by signal: {signal.strsignal(-code)}." if code < 0
                else f"DataLoader worker (pid {worker.pid}) exited unexpectedly")
        return describe_worker_failure(RuntimeError(text), rank)
    return None


def worker_batches(dataset, loading: Loading, rank: int, sampler=None) -> Iterator[dict]:
    """The batches a DataLoader's workers make from `dataset` (whole batches: no collation), in
    pinned memory when `loading` says so; a worker that hangs or dies ends them with one DataError line."""
    # generator: the DataLoader draws its workers' base seed from it, and without one from the global torch
    # RNG, which is the training process's dropout stream: a joint stage's student would no longer equal
    # its solo run. The batches are pure functions of (seed, position), so the workers' seeds change nothing.
    batches = iter(DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=loading.num_workers,
                              prefetch_factor=2, timeout=WORKER_TIMEOUT_S, pin_memory=loading.pin_memory,
                              generator=torch.Generator().manual_seed(0)))
    while True:
        try:
            batch = next(batches)
        except (RuntimeError, OSError, EOFError) as exc:
            # a worker that dies mid-transfer can also surface as a reset connection
            line = describe_worker_failure(exc, rank) or dead_worker_line(batches, rank)
            if line is None:
                raise
            raise DataError(line) from None
        yield batch


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
                batch = stream.next_batch(self.loader.batch_size, self.loader.pad_multiple)
            except UserError as exc:  # hand it to the main process as one clean line
                yield {"_error": str(exc), "_worker": worker}
                return
            batch["_worker"] = worker
            batch["_state"] = stream.state_dict()
            yield batch


class StreamingCorpusLoader:
    def __init__(self, data_cfg, tokenizer, batch_size: int, rank: int, world_size: int, seed: int, *,
                 pad_multiple: int = 1, loading: Loading | None = None):
        self.cfg, self.tokenizer, self.batch_size = data_cfg, tokenizer, batch_size
        self.pad_multiple = pad_multiple   # batch widths only: not part of the state, a resume may change it
        self.rank, self.world_size, self.seed = rank, world_size, seed
        # unset: data.num_workers for the CPU (auto: 0), unpinned
        self.loading = loading if loading is not None else Loading.for_device(data_cfg.num_workers, "cpu")
        self.num_workers = self.loading.num_workers
        self.stats = ReadStats()
        self.sources = corpus_sources(data_cfg, self.stats)
        workers = max(1, self.num_workers)
        self._states: list = [None] * workers   # per worker: SequenceStream state, None = start
        self._next_worker = 0
        self._inline = self._stream(0) if self.num_workers == 0 else None

    def _stream(self, worker: int) -> SequenceStream:
        consumer = Consumer(self.rank, self.world_size, worker, max(1, self.num_workers))
        return SequenceStream(self.sources, self.cfg, self.tokenizer, consumer, self.seed, self.stats, self.batch_size)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._inline is not None:
            while True:
                yield self._inline.next_batch(self.batch_size, self.pad_multiple)
        dataset = _WorkerBatches(self, list(self._states), self._next_worker)
        for batch in worker_batches(dataset, self.loading, self.rank):
            worker = batch.pop("_worker")
            if "_error" in batch:
                raise DataError(batch["_error"])
            self._states[worker] = batch.pop("_state")
            self._next_worker = (worker + 1) % self.num_workers
            yield batch

    def state_dict(self) -> dict:
        streams = [self._inline.state_dict()] if self._inline is not None else list(self._states)
        return loader_state("streaming", rank=self.rank, world_size=self.world_size, num_workers=self.num_workers,
                            seed=self.seed, packing=self.cfg.packing, batch_size=self.batch_size,
                            next_worker=self._next_worker, streams=streams)

    def load_state_dict(self, state: dict) -> None:
        # the window's contents depend on the packing, its order on the batch size (length grouping)
        check_state(state, "streaming", world_size=self.world_size, seed=self.seed, rank=self.rank,
                    num_workers=self.num_workers, packing=self.cfg.packing, batch_size=self.batch_size)
        if self._inline is not None:
            self._inline.load_state_dict(state["streams"][0])
        else:
            self._states = list(state["streams"])
            self._next_worker = int(state["next_worker"])


def build_general_loader(data_cfg, tokenizer, batch_size: int, rank: int, world_size: int, seed: int, *,
                         device="cpu"):
    """The general-corpus loader named by the recipe's data section, for batches bound for `device`
    (their widths round up as packing.pad_multiple_for says; workers and pinning as data/workers.py says)."""
    multiple = pad_multiple_for(device)
    if data_cfg.source == "shards":
        if data_cfg.corpus is None:
            raise DataError("data.corpus: data.source=shards needs the folder written by `ernie-tiny-ds preprocess`")
        return ShardLoader(data_cfg.corpus, tokenizer, batch_size, rank, world_size, seed, data_cfg.max_seq_len,
                           pad_multiple=multiple)
    return StreamingCorpusLoader(data_cfg, tokenizer, batch_size, rank, world_size, seed, pad_multiple=multiple,
                                 loading=Loading.for_device(data_cfg.num_workers, device))

"""One consumer's endless stream of packed sequences, with a seeded shuffle window and exact resume.

The shuffle works on windows: read documents from position P until at least `shuffle_buffer`
sequences are packed, shuffle them with an RNG seeded by (seed, consumer, epoch, P), hand them out,
repeat. A window never spans two epochs; the file order changes every epoch (sharding.py).
Because the window is a pure function of its start position, the state is a handful of plain values
(epoch, file, byte offset, piece, document number, sequences already handed out of the window):
the buffer and RNG state are rebuilt from it on resume instead of being stored.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Iterator, Optional

from ..errors import DataError
from .packing import TokenEncoder, collate, pack_pieces, pieces_of
from .sharding import Consumer, epoch_plan
from .sources import ReadStats, read_records

GROUP_CHARS = 65_536   # text tokenized per batched tokenizer call
GROUP_PIECES = 512


@dataclass(frozen=True)
class Position:
    """The next piece to read: record at `offset` of the epoch plan's file `file`, from piece `piece` on."""
    epoch: int = 0
    file: int = 0
    path: str = ""
    offset: int = 0
    piece: int = 0
    record: int = 0   # running document number in the epoch (interleaved sharding)


def owned_pieces(sources: list[str], data_cfg, consumer: Consumer, seed: int, pos: Position,
                 stats: ReadStats) -> Iterator[tuple[str, Position]]:
    """The consumer's pieces of epoch `pos.epoch` from `pos` on, each with the position right after it."""
    plan = epoch_plan(sources, consumer, pos.epoch, seed)
    if pos.file < len(plan.files) and pos.path and plan.files[pos.file] != pos.path:
        raise DataError(f"data.corpus changed since the checkpoint: {consumer} expected {pos.path} "
                        f"as file {pos.file} of epoch {pos.epoch}, found {plan.files[pos.file]}")
    record = pos.record
    for index in range(pos.file, len(plan.files)):
        path = plan.files[index]
        resuming = index == pos.file
        for rec in read_records(path, pos.offset if resuming else 0, data_cfg, stats):
            if not plan.interleave or record % consumer.count == consumer.index:
                pieces = pieces_of(rec.text)
                first = pos.piece if resuming and rec.offset == pos.offset else 0
                for k in range(first, len(pieces)):
                    yield pieces[k], Position(pos.epoch, index, path, rec.offset, k + 1, record)
            record += 1


def next_group(pieces: Iterator[tuple[str, Position]]) -> list[tuple[str, Position]]:
    """The next pieces for one batched tokenizer call: about GROUP_CHARS characters, at most GROUP_PIECES
    ([] when `pieces` is exhausted). The iterator is left right after the group's last piece."""
    group, chars = [], 0
    for text, after in pieces:
        group.append((text, after))
        chars += len(text)
        if chars >= GROUP_CHARS or len(group) >= GROUP_PIECES:
            break
    return group


class SequenceStream:
    def __init__(self, sources: list[str], data_cfg, tokenizer, consumer: Consumer, seed: int,
                 stats: Optional[ReadStats] = None):
        self.sources = sources
        self.cfg = data_cfg
        self.tokenizer = tokenizer
        self.encoder = TokenEncoder(tokenizer)
        self.consumer = consumer
        self.seed = seed
        self.stats = stats or ReadStats()
        self._window_start = Position()
        self._window: list[list[int]] = []
        self._order: list[int] = []
        self._emitted = 0
        self._cursor = Position()                 # after the window's last piece
        self._pieces: Optional[Iterator[tuple[str, Position]]] = None

    # --- reading -----------------------------------------------------------------------------
    def _pieces_from(self, pos: Position) -> Iterator[tuple[str, Position]]:
        return owned_pieces(self.sources, self.cfg, self.consumer, self.seed, pos, self.stats)

    def _read_window(self, start: Position) -> tuple[list[list[int]], Position]:
        """Sequences of the window starting at `start`, and the position after it ([] at epoch end)."""
        if self._pieces is None or self._cursor != start:
            self._pieces = self._pieces_from(start)
        sequences: list[list[int]] = []
        end = start
        while len(sequences) < self.cfg.shuffle_buffer:
            group = next_group(self._pieces)
            if not group:
                break
            end = group[-1][1]
            for piece_sequences in pack_pieces([text for text, _ in group], self.encoder, self.cfg.max_seq_len):
                sequences.extend(piece_sequences)
        return sequences, end

    def _next_window(self) -> None:
        start = self._cursor
        sequences, end = self._read_window(start)
        if not sequences:  # epoch over: the next one starts at its first file
            if start.file == 0 and start.offset == 0 and start.piece == 0:
                raise DataError(f"data.corpus: {self.consumer} of {self.consumer.count} consumer(s) got no document "
                                f"from {len(self.sources)} source(s); use more text or fewer ranks/workers")
            start = Position(epoch=start.epoch + 1)
            self._pieces = None
            sequences, end = self._read_window(start)
            if not sequences:
                raise DataError(f"data.corpus: {self.consumer} got no document in epoch {start.epoch}")
        self._set_window(start, sequences, end)

    def _set_window(self, start: Position, sequences: list[list[int]], end: Position) -> None:
        order = list(range(len(sequences)))
        rng = random.Random(f"window:{self.seed}:{self.consumer.index}:{start.epoch}:{start.file}:"
                            f"{start.offset}:{start.piece}")
        rng.shuffle(order)
        self._window_start, self._window, self._order, self._emitted = start, sequences, order, 0
        self._cursor = end

    # --- handing out ---------------------------------------------------------------------------
    def next_sequence(self) -> list[int]:
        if not self._window:  # a new stream, or one restored by load_state_dict: build its window
            emitted, self._pieces = self._emitted, None
            self._set_window(self._window_start, *self._read_window(self._window_start))
            self._emitted = emitted
        while self._emitted >= len(self._window):
            self._next_window()
        seq = self._window[self._order[self._emitted]]
        self._emitted += 1
        return seq

    def next_batch(self, batch_size: int):
        return collate([self.next_sequence() for _ in range(batch_size)], self.cfg.max_seq_len,
                       self.tokenizer.pad_token_id)

    @property
    def epoch(self) -> int:
        """The epoch of the sequence handed out last."""
        return self._window_start.epoch

    def state_dict(self) -> dict:
        return {"window_start": asdict(self._window_start), "emitted": self._emitted}

    def load_state_dict(self, state: dict) -> None:
        self._window_start = Position(**state["window_start"])
        self._emitted = int(state["emitted"])
        self._window, self._order, self._pieces = [], [], None  # rebuilt from window_start on first use

"""One consumer's endless stream of packed sequences, with a seeded shuffle window and exact resume.

The shuffle works on windows: read documents from position P until at least `shuffle_buffer`
sequences are packed, shuffle them with an RNG seeded by (seed, consumer, epoch, P), hand them out,
repeat. A window never spans two epochs; the file order changes every epoch (sharding.py).
Because the window is a pure function of its start position, the state is a handful of plain values
(epoch, file, byte offset, piece, document number, sequences already handed out of the window):
the buffer and RNG state are rebuilt from it on resume instead of being stored.

Length grouping: the shuffled window is sorted by length in chunks of GROUP_BATCHES batches, cut
into batches, and the batch order shuffled again, so a batch holds sequences of similar length and
pads little (collate pads to the batch's longest, rounded up to 8 for CUDA). A window is rarely a whole
number of batches, so its first rows complete the batch the window before left open, and its grouped
batches start on batch boundaries (without that, every batch of the window straddled two length
groups). The order is a pure function of the window, the batch size and that count of open rows
(kept in the state), so resume stays exact and every sequence of a window is handed out once.
With data.packing: full, sequences fill across documents (packing.FullPacker).
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Iterator, Optional

from ..errors import DataError
from .packing import FullPacker, TokenEncoder, collate, pack_pieces, pieces_of
from .sharding import Consumer, epoch_plan
from .sources import ReadStats, read_records

GROUP_CHARS = 65_536   # text tokenized per batched tokenizer call
GROUP_PIECES = 512
GROUP_BATCHES = 16     # length grouping: sort chunks of this many batches of the shuffled window


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


def grouped_order(lengths: list[int], batch_size: int, rng: random.Random, filled: int = 0) -> list[int]:
    """A shuffled order of range(len(lengths)) in which each run of `batch_size` holds similar lengths:
    shuffle, sort chunks of GROUP_BATCHES batches by length (stable: equal lengths stay shuffled), cut
    into batches, shuffle the whole batches. `filled` rows of the batch being handed out came from the
    window before: the first batch_size - filled rows of the shuffle complete that batch, so the
    grouped batches after them start on batch boundaries. A short last batch stays last (it
    continues into the next window), so it never splits a grouped batch."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if batch_size <= 1:
        return order
    head, order = order[:-filled % batch_size], order[-filled % batch_size:]
    chunk = batch_size * GROUP_BATCHES
    order = [i for c in range(0, len(order), chunk) for i in sorted(order[c:c + chunk], key=lengths.__getitem__)]
    full = len(order) - len(order) % batch_size
    batches = [order[b:b + batch_size] for b in range(0, full, batch_size)]
    rng.shuffle(batches)
    return head + [i for batch in batches for i in batch] + order[full:]


class SequenceStream:
    def __init__(self, sources: list[str], data_cfg, tokenizer, consumer: Consumer, seed: int,
                 stats: Optional[ReadStats] = None, batch_size: int = 1):
        self.sources = sources
        self.batch_size = batch_size  # the unit of length grouping; 1: a plain shuffle
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
        self._filled_at_start = 0                 # rows of the open batch handed out before this window
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
        full = FullPacker(self.encoder, self.cfg.max_seq_len) if self.cfg.packing == "full" else None
        while len(sequences) < self.cfg.shuffle_buffer:
            group = next_group(self._pieces)
            if not group:
                break
            end = group[-1][1]
            texts = [text for text, _ in group]
            if full is not None:  # after.piece == 1: the piece is the first of its document
                sequences.extend(full.add(texts, [after.piece == 1 for _, after in group]))
                continue
            for piece_sequences in pack_pieces(texts, self.encoder, self.cfg.max_seq_len):
                sequences.extend(piece_sequences)
        if full is not None:  # a window is a pure function of its start: it never carries a part-filled sequence
            sequences.extend(full.flush())
        return sequences, end

    def _next_window(self) -> None:
        start, filled = self._cursor, self._filled()
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
        self._set_window(start, sequences, end, filled)

    def _set_window(self, start: Position, sequences: list[list[int]], end: Position, filled: int) -> None:
        rng = random.Random(f"window:{self.seed}:{self.consumer.index}:{start.epoch}:{start.file}:"
                            f"{start.offset}:{start.piece}")
        order = grouped_order([len(s) for s in sequences], self.batch_size, rng, filled)
        self._window_start, self._window, self._order, self._emitted = start, sequences, order, 0
        self._filled_at_start = filled
        self._cursor = end

    def _filled(self) -> int:
        """Rows of the batch being handed out that are already out."""
        return (self._filled_at_start + self._emitted) % max(self.batch_size, 1)

    # --- handing out ---------------------------------------------------------------------------
    def next_sequence(self) -> list[int]:
        if not self._window:  # a new stream, or one restored by load_state_dict: build its window
            emitted, self._pieces = self._emitted, None
            self._set_window(self._window_start, *self._read_window(self._window_start), self._filled_at_start)
            self._emitted = emitted
        while self._emitted >= len(self._window):
            self._next_window()
        seq = self._window[self._order[self._emitted]]
        self._emitted += 1
        return seq

    def next_batch(self, batch_size: Optional[int] = None, pad_multiple: int = 1):
        """The next batch, padded to its longest sequence rounded up to `pad_multiple`
        (packing.pad_multiple_for). Pass no size (or the stream's): the window order groups lengths for
        the stream's batch size. The width never changes which sequences come next, so resume is the same."""
        return collate([self.next_sequence() for _ in range(batch_size or self.batch_size)], self.cfg.max_seq_len,
                       self.tokenizer.pad_token_id, pad_multiple)

    @property
    def epoch(self) -> int:
        """The epoch of the sequence handed out last."""
        return self._window_start.epoch

    def state_dict(self) -> dict:
        return {"window_start": asdict(self._window_start), "emitted": self._emitted,
                "filled_at_start": self._filled_at_start}

    def load_state_dict(self, state: dict) -> None:
        self._window_start = Position(**state["window_start"])
        self._emitted = int(state["emitted"])
        # a position saved before windows were aligned to batches: its window was ordered as with 0
        self._filled_at_start = int(state.get("filled_at_start", 0))
        self._window, self._order, self._pieces = [], [], None  # rebuilt from window_start on first use

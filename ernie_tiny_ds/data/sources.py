"""Corpus sources: find the files, sniff what they hold, and read documents from a resumable position.

A source file is read as a sequence of *records* (one document each). Every record has an
`offset` (the byte offset of its start in the decompressed stream, or its row number for Parquet
and `datasets`), so a reader can be reopened at any record: that is what makes resume exact.
Compression (gzip, bz2, zstd) is recognised by the file's magic bytes, not by its name.
"""
from __future__ import annotations

import bz2
import glob
import gzip
import io
import json
import os
import warnings
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator, Optional

from ..assets import DEFAULT_CORPUS_GLOB
from ..errors import DataError

SNIFF_BYTES = 8192
MAX_RECORD_BYTES = 256 * 1024 * 1024  # one line/document larger than this is refused, not read into memory
_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bz2", b"\x28\xb5\x2f\xfd": "zstd"}


class DataWarning(UserWarning):
    """Data that was read with a repair (invalid UTF-8) or skipped (binary file)."""


@dataclass(frozen=True)
class Record:
    offset: int        # where the record starts: decompressed byte offset, or row number
    text: str


@dataclass
class ReadStats:
    """What the readers repaired or skipped; warnings are emitted once per file per process."""
    invalid_utf8: dict = field(default_factory=dict)   # path -> records with invalid UTF-8
    skipped_binary: list = field(default_factory=list)
    empty_files: list = field(default_factory=list)
    _warned: set = field(default_factory=set)

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, DataWarning, stacklevel=3)


def resolve_files(pattern: str, key: str = "data.corpus") -> list[str]:
    """A file, a folder (every file below it) or a glob, sorted so every rank sees the same order."""
    if os.path.isdir(pattern):
        files = []
        for root, dirs, names in os.walk(pattern):
            dirs[:] = [d for d in dirs if not d.startswith(".")]  # .git/, .cache/: never corpus text
            files.extend(os.path.join(root, name) for name in names if not name.startswith("."))
    elif os.path.isfile(pattern):
        files = [pattern]
    else:
        files = [f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f)]
    if not files:
        raise DataError(f"{key}: {pattern!r} matches no file")
    return sorted(files)


def _raw_head(path: str, size: int) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(size)


def _compression(head: bytes) -> Optional[str]:
    for magic, name in _MAGIC.items():
        if head.startswith(magic):
            return name
    return None


def compression_of(path: str) -> Optional[str]:
    return _compression(_raw_head(path, 4))


class _ZstdReader(io.RawIOBase):
    """A zstd file's content, every frame of it. zstandard's stream_reader stops at the end of the
    first frame and takes a file cut inside a frame for a clean end; this one raises EOFError there
    (a truncated file), like gzip and bz2 do."""

    def __init__(self, path: str):
        import zstandard
        self._raw = open(path, "rb")
        self._dctx = zstandard.ZstdDecompressor()
        self._frame = None     # the decompressor of the current frame; None before the first byte
        self._out = b""
        self._pos = 0

    def readable(self) -> bool:
        return True

    def _feed(self, chunk: bytes) -> bytes:
        parts = []
        while chunk:
            if self._frame is None or self._frame.eof:
                self._frame = self._dctx.decompressobj()
            parts.append(self._frame.decompress(chunk))
            chunk = self._frame.unused_data if self._frame.eof else b""  # the next frame's first bytes
        return b"".join(parts)

    def readinto(self, buffer) -> int:
        while self._pos >= len(self._out):
            chunk = self._raw.read(1 << 17)
            if not chunk:
                if self._frame is not None and not self._frame.eof:
                    raise EOFError("the file ends inside a zstd frame (truncated)")
                return 0
            self._out, self._pos = self._feed(chunk), 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = memoryview(self._out)[self._pos:self._pos + n]
        self._pos += n
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def open_decompressed(path: str) -> BinaryIO:
    """The file's bytes, decompressed when its magic says so."""
    kind = compression_of(path)
    if kind == "gzip":
        return gzip.open(path, "rb")
    if kind == "bz2":
        return bz2.open(path, "rb")
    if kind == "zstd":
        return io.BufferedReader(_ZstdReader(path), buffer_size=1 << 16)
    return open(path, "rb")


def _read_errors() -> tuple:
    """What a damaged file raises while it is read: truncated (EOFError), corrupt gzip/bz2 (OSError,
    zlib.error), corrupt zstd (ZstdError)."""
    errors = [EOFError, OSError, zlib.error]
    try:
        import zstandard
        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def _read_failure(path: str, where: str, exc: BaseException) -> DataError:
    verb = "cannot decompress" if compression_of(path) else "cannot read"
    return DataError(f"data.corpus: {verb} {path} at {where}: {str(exc) or type(exc).__name__} "
                     f"(the file is truncated or damaged; replace or remove it)")


def looks_binary(path: str, head: Optional[bytes] = None) -> bool:
    """NUL bytes in the first 8 KiB of the (decompressed) content: no text corpus has them.
    `head`: the file's first raw bytes when the caller has read them (spares an uncompressed file a read)."""
    if head is not None and _compression(head) is None:
        return b"\x00" in head[:SNIFF_BYTES]
    try:
        with open_decompressed(path) as stream:
            head = stream.read(SNIFF_BYTES)
    except Exception as exc:  # corrupt gzip/bz2 (OSError, EOFError), zstandard's own ZstdError
        raise DataError(f"data.corpus: cannot decompress {path}: {exc}") from None
    return b"\x00" in head


def format_of(path: str, configured: str, head: Optional[bytes] = None) -> str:
    """The reader for one file: the configured format, or for `auto` Parquet/JSON lines/text by content and name."""
    if configured != "auto":
        return configured
    if (head if head is not None else _raw_head(path, 4)).startswith(b"PAR1"):
        return "parquet"
    name = path.lower()
    for suffix in (".gz", ".bz2", ".zst", ".zstd"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return "jsonl" if name.endswith((".jsonl", ".json", ".ndjson")) else "text"


def check_files(files: list[str], data_cfg, stats: ReadStats) -> list[str]:
    """Drop empty files; drop (on_binary_file=skip) or refuse binary ones, before any rank starts reading."""
    kept = []
    for path in files:
        if os.path.getsize(path) == 0:  # nothing to read; kept out so no consumer owns only empty files
            stats.empty_files.append(path)
            continue
        head = _raw_head(path, SNIFF_BYTES)  # one read for the Parquet, compression and NUL checks
        if format_of(path, data_cfg.format, head) != "parquet" and looks_binary(path, head):
            if data_cfg.on_binary_file == "error":
                raise DataError(f"data.corpus: {path} is a binary file, not text; remove it from the corpus "
                                f"or set data.on_binary_file=skip")
            stats.skipped_binary.append(path)
            stats.warn_once("binary:" + path, f"skipping binary file {path} (data.on_binary_file=skip)")
            continue
        kept.append(path)
    return kept


# --- readers: each yields Records from a start offset --------------------------------------------

def _where(line: int, offset: int) -> str:
    return f"line {line}" if line > 0 else f"byte offset {offset}"  # line numbers are unknown after a seek


def _decode(raw: bytes, path: str, line: int, offset: int, stats: ReadStats, bad: list[int]) -> str:
    """UTF-8 text of a line; invalid bytes become U+FFFD. `bad` counts them in this pass over the file,
    and the stats keep the largest pass count, so reading a file again (next epoch) does not double it."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        bad[0] += 1
        stats.invalid_utf8[path] = max(stats.invalid_utf8.get(path, 0), bad[0])
        stats.warn_once("utf8:" + path, f"{path}: invalid UTF-8 at {_where(line, offset)} replaced with U+FFFD "
                        f"(further lines of this file are counted, not reported)")
        return raw.decode("utf-8", errors="replace")


def open_at(path: str, offset: int) -> BinaryIO:
    """The decompressed stream positioned at `offset`: a seek for plain files, decompress-and-discard otherwise."""
    stream = open_decompressed(path)
    if offset == 0:
        return stream
    if compression_of(path) is None:
        stream.seek(offset)
        return stream
    left = offset
    try:
        while left:
            chunk = stream.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)
    except _read_errors() as exc:
        stream.close()
        raise _read_failure(path, f"byte offset {offset - left}", exc) from None
    return stream


def _lines(stream: BinaryIO, path: str, start: int) -> Iterator[tuple[int, int, bytes]]:
    """(offset, line number or -1 when unknown after a seek, raw bytes) of every line from `start`."""
    offset = start
    number = 1 if start == 0 else -1
    errors = _read_errors()
    while True:
        try:  # a damage past the 8 KiB sniffed up front shows here, mid-epoch: name file and line
            raw = stream.readline(MAX_RECORD_BYTES + 1)
        except errors as exc:
            raise _read_failure(path, _where(number, offset), exc) from None
        if not raw:
            return
        if b"\x00" in raw:  # NUL past the sniffed head: binary content; found per line, no second pass
            raise DataError(f"data.corpus: {path}: {_where(number, offset)} holds NUL bytes: a binary file, not "
                            f"text; remove it from the corpus")
        if len(raw) > MAX_RECORD_BYTES and not raw.endswith(b"\n"):
            raise DataError(f"{path}: {_where(number, offset)} is longer than {MAX_RECORD_BYTES:,} bytes "
                            f"without a line break; split the document")
        yield offset, number, raw
        offset += len(raw)
        if number > 0:
            number += 1


def read_text(path: str, start: int, separator: str, stats: ReadStats) -> Iterator[Record]:
    bad = [0]
    with open_at(path, start) as stream:
        if separator == "line":
            for offset, number, raw in _lines(stream, path, start):
                text = _decode(raw, path, number, offset, stats, bad).strip()
                if text:
                    yield Record(offset, text)
            return
        parts: list[str] = []  # blank_line: a document is the run of non-empty lines up to a blank one
        first, size = (start, 1), 0
        for offset, number, raw in _lines(stream, path, start):
            text = _decode(raw, path, number, offset, stats, bad).strip()
            if text:
                if not parts:
                    first, size = (offset, number), 0
                parts.append(text)
                size += len(raw)
                if size > MAX_RECORD_BYTES:
                    raise DataError(f"{path}: the document from {_where(*first[::-1])} runs over {MAX_RECORD_BYTES:,} "
                                    f"bytes without a blank line; is data.document_separator=blank_line right?")
            elif parts:
                yield Record(first[0], "\n".join(parts))
                parts = []
        if parts:
            yield Record(first[0], "\n".join(parts))


def read_jsonl(path: str, start: int, text_field: str, stats: ReadStats) -> Iterator[Record]:
    bad = [0]
    with open_at(path, start) as stream:
        for offset, number, raw in _lines(stream, path, start):
            line = _decode(raw, path, number, offset, stats, bad).strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: {_where(number, offset)}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or text_field not in row:
                raise DataError(f"{path}: {_where(number, offset)}: no field {text_field!r} (data.text_field)")
            text = row[text_field]
            if not isinstance(text, str):
                raise DataError(f"{path}: {_where(number, offset)}: field {text_field!r} is "
                                f"{type(text).__name__}, not text")
            text = text.strip()
            if text:
                yield Record(offset, text)


def read_parquet(path: str, start: int, text_field: str) -> Iterator[Record]:
    import pyarrow.parquet as pq
    try:
        table = pq.ParquetFile(path)
    except Exception as exc:
        raise DataError(f"{path}: cannot read as Parquet: {exc}") from None
    if text_field not in table.schema_arrow.names:
        raise DataError(f"{path}: no column {text_field!r} (data.text_field); columns: {table.schema_arrow.names}")
    first, row = 0, 0  # skip whole row groups before `start` without reading them
    while first < table.num_row_groups and row + table.metadata.row_group(first).num_rows <= start:
        row += table.metadata.row_group(first).num_rows
        first += 1
    groups = list(range(first, table.num_row_groups))
    for batch in table.iter_batches(batch_size=1024, columns=[text_field], row_groups=groups) if groups else ():
        for value in batch.column(0).to_pylist():
            if row >= start and isinstance(value, str) and value.strip():
                yield Record(row, value.strip())
            row += 1


def read_datasets(name: str, start: int, text_field: str, split: str) -> Iterator[Record]:
    """A Hugging Face `datasets` dataset (local folder or name), streamed; offset = row number.

    It counts as one source, so consumers interleave its rows; a resume skips `start` rows."""
    import datasets
    try:
        dataset = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as exc:  # the library raises many types for a missing/unreadable dataset
        raise DataError(f"data.corpus: cannot open {name!r} with datasets.load_dataset (split {split!r}): "
                        f"{type(exc).__name__}: {exc}") from None
    if start:
        dataset = dataset.skip(start)
    for row, example in enumerate(dataset, start=start):
        if text_field not in example:
            raise DataError(f"data.corpus: dataset {name!r} row {row}: no column {text_field!r} (data.text_field)")
        text = example[text_field]
        if isinstance(text, str) and text.strip():
            yield Record(row, text.strip())


def read_records(path: str, start: int, data_cfg, stats: ReadStats) -> Iterator[Record]:
    """Records of one source from `start`, with the reader its format asks for."""
    kind = format_of(path, data_cfg.format)
    if kind == "datasets":
        return read_datasets(path, start, data_cfg.text_field, data_cfg.dataset_split)
    if kind == "parquet":
        return read_parquet(path, start, data_cfg.text_field)
    if kind == "jsonl":
        return read_jsonl(path, start, data_cfg.text_field, stats)
    return read_text(path, start, data_cfg.document_separator, stats)


def corpus_sources(data_cfg, stats: ReadStats) -> list[str]:
    """The ordered list of sources of data.corpus (files, or one dataset name for format=datasets)."""
    pattern = data_cfg.corpus
    if pattern is None:
        pattern = str(DEFAULT_CORPUS_GLOB)
    if data_cfg.format == "datasets":
        return [pattern]
    files = check_files(resolve_files(pattern), data_cfg, stats)
    if not files:
        raise DataError(f"data.corpus: every file of {pattern!r} is empty or was skipped as binary; no text left")
    return files

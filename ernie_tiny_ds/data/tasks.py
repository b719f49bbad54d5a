"""Task data for stages 3-4, teacher finetuning and evaluation: GLUE-style single-sentence and
sentence-pair tasks, classification or regression (STS-B style), from .tsv, .csv or .jsonl files.

Files: a header row names the columns (.tsv: tab-separated, no quoting, as GLUE ships them;
.csv: comma-separated with standard quoting); .jsonl (or .json): one JSON object per line. With
task.header false (GLUE's CoLA) there is no header row and columns are 0-based indices. A
`datasets` dataset (task.dataset) is read by data/task_datasets.py into the same examples.
Labels: `task.labels` lists the class names in id order; when it is empty, the classes are the
labels found in the train file, sorted (numerically when they are all numbers, else as text),
and a dev label outside that set is an error. Label text is normalised first: surrounding
whitespace is dropped and labels equal as numbers are one class (`1`, `1.0`, `1 ` and JSON 1 all
name class "1"); an empty label is an error naming the file and line. Regression labels are numbers, num_labels = 1.

The train loader follows the loader contract of data/corpus.py (endless batches, disjoint rank
shards, exact resume). Each epoch is a new seeded permutation; every rank takes the same number
of batches per epoch (the tail that does not fill one batch on every rank waits for the next
epoch's shuffle). The epoch's examples are length-grouped as the general stages group theirs
(data/stream.py): chunks of GROUP_BATCHES global batches are sorted by token length, cut into global
batches (one micro-batch per rank, neighbours in length) and the batches shuffled, so the order
stays a pure function of (seed, epoch) and resume stays exact. Dev and prediction batches are cut
from the examples sorted by length. Every batch is padded to its longest sequence exactly: task
sentences are short (the bundled sentiment task averages 12 tokens), and rounding widths up to 8,
as the general stages do, would pad a quarter of such a batch.
"""
from __future__ import annotations

import csv
import dataclasses
import decimal
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from ..assets import BUNDLED_TASKS, task_dir
from ..config import TaskConfig
from ..errors import ConfigError, DataError
from .benchmarks import main_metric
from .contract import check_state, loader_state
from .corpus import worker_batches
from .packing import TokenEncoder
from .stream import GROUP_BATCHES
from .task_datasets import describe, get_split, open_dataset, raw_split, split_names
from .workers import Loading

FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}  # .json: JSON lines too
LENGTH_CHUNK = 4096  # texts per tokenizer call when measuring lengths
ORDER = "length_grouped"  # the train order a saved position refers to
MAX_SORTED_PADDING = 0.05  # dev and prediction batches: the padded share a batch may reach


@dataclass
class Example:
    texts: tuple[str, ...]      # one (single sentence) or two (pair) texts
    label: int | float          # class id, or the regression target (-1 / nan: unlabelled test rows)
    source: str                 # "file:line", for messages
    index: int | None = None    # the dataset's idx (else the row number): a submission file's index


@dataclass
class TaskData:
    name: str
    type: str                   # classification | regression
    text_columns: list[str]
    label_names: list[str]      # class names in id order; [] for regression
    train: list[Example]
    dev: list[Example]
    max_seq_len: int
    train_file: str
    dev_file: str | None
    metric: str | None = None   # task.metric (None: the official metric of the task's name, see benchmarks)
    dev_splits: dict[str, list[Example]] = dataclasses.field(default_factory=dict)  # several dev splits
                                # by name (mnli: matched, mismatched); `dev` is the first
    selection: list[Example] = dataclasses.field(default_factory=list)  # task.selection_split, held out of train

    @property
    def num_labels(self) -> int:
        return 1 if self.type == "regression" else len(self.label_names)

    @property
    def main_metric(self) -> str:
        return main_metric(self.name, self.type, self.metric)


# --------------------------------------------------------------------------- task config
def resolve_task(cfg: TaskConfig) -> TaskConfig:
    """The task config with a bundled task's files and fields filled in, checked for completeness."""
    # columns are names, or 0-based indices (as text) when the files have no header row
    resolved = dataclasses.replace(cfg, text_columns=[str(c) for c in cfg.text_columns], labels=list(cfg.labels),
                                   label_column=str(cfg.label_column))
    if not cfg.header:
        for column in [*resolved.text_columns, resolved.label_column]:
            if not column.isdigit():
                raise ConfigError(f"task.header is false: columns are 0-based indices, got {column!r} "
                                  f"(task.text_columns / task.label_column)")
    if cfg.dataset is not None and (cfg.train_file is not None or cfg.dev_file is not None):
        raise ConfigError("task.dataset: give a dataset or task files (train_file, dev_file), not both")
    if cfg.name in BUNDLED_TASKS and cfg.train_file is None and cfg.dataset is None:
        folder = task_dir(cfg.name)
        meta = json.loads((folder / "task.json").read_text(encoding="utf-8"))
        resolved.train_file = str(folder / "train.tsv")
        resolved.dev_file = cfg.dev_file or str(folder / "dev.tsv")
        resolved.text_columns = cfg.text_columns or list(meta["text_columns"])
        resolved.labels = cfg.labels or list(meta["labels"])
        resolved.label_column = meta.get("label_column", cfg.label_column)
        if cfg.type != "classification" and cfg.type != meta["type"]:
            raise ConfigError(f"task.type: the bundled task {cfg.name!r} is {meta['type']}, not {cfg.type}")
        resolved.type = meta["type"]
    if resolved.train_file is None and cfg.dataset is None:
        raise ConfigError(f"task.train_file: not set, and task.name {cfg.name!r} is not a bundled task "
                          f"({', '.join(BUNDLED_TASKS)}); or set task.dataset")
    if (resolved.text_columns or cfg.dataset is None) and not 1 <= len(resolved.text_columns) <= 2:
        raise ConfigError(f"task.text_columns: give one column (single sentence) or two (sentence pair), "
                          f"got {resolved.text_columns}")
    if resolved.type == "regression" and resolved.labels:
        raise ConfigError("task.labels: must be empty for a regression task")
    if len(set(resolved.labels)) != len(resolved.labels):
        raise ConfigError(f"task.labels: names repeat: {resolved.labels}")
    if not 8 <= resolved.max_seq_len <= 8192:
        raise ConfigError(f"task.max_seq_len must be in 8..8192, got {resolved.max_seq_len}")
    if cfg.dataset is None:  # a dataset's type may come from its features: checked once they are read
        main_metric(resolved.name, resolved.type, resolved.metric)  # a metric that fits the task type
    return resolved


# --------------------------------------------------------------------------- reading files
def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"{path}: task file not found")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text") from None


def _rows(path: Path, columns: Sequence[str], header: bool = True) -> Iterator[tuple[int, dict]]:
    """(line number, {column: value}) of every record; checks the columns and field counts. Without
    a header row the columns are 0-based indices ("3") and every row needs as many fields as the widest one used."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{path}: unsupported task file type {path.suffix!r}; use .tsv, .csv or .jsonl (JSON lines)")
    text = _read_text(path)
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    if fmt == "jsonl":
        yield from _jsonl_rows(path, text, columns)
        return
    stream = io.StringIO(text, newline="")  # csv counts lines itself (quoted fields may span lines)
    if fmt == "tsv":
        reader = csv.reader(stream, delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(stream)
    if not header:
        yield from _indexed_rows(path, reader, fmt, columns)
        return
    records = _records(path, reader, fmt)
    first = next(records, None)
    if first is None:
        raise DataError(f"{path}: the file is empty")
    header = first[1]
    missing = [c for c in columns if c not in header]
    if missing:
        raise DataError(f"{path}: no column {', '.join(repr(c) for c in missing)} (its columns: "
                        f"{', '.join(header)})")
    for line, record in records:
        if len(record) != len(header):
            raise DataError(f"{path}:{line}: {len(record)} fields, the header has {len(header)}"
                            f"{_runs_on(reader, line)}")
        yield line, dict(zip(header, record))


def _records(path: Path, reader, fmt: str) -> Iterator[tuple[int, list[str]]]:
    """(the line a record starts on, its fields) of every non-blank record. A quoted field may span
    lines, so the reader's line count after a record is where it ended, not where it began: an
    unclosed quote swallows the rest of the file, and the place to name is the line that opened it."""
    start = 1
    while True:
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(f"{path}:{start}: malformed {fmt} row ({exc}){_runs_on(reader, start)}") from None
        if record:  # a blank line is no record
            yield start, record
        start = reader.line_num + 1


def _runs_on(reader, start: int) -> str:
    if reader.line_num <= start:
        return ""
    return f"; the row runs on to line {reader.line_num}: is a quote opened on line {start} never closed?"


def _indexed_rows(path: Path, reader, fmt: str, columns: Sequence[str]) -> Iterator[tuple[int, dict]]:
    need = max(int(c) for c in columns) + 1
    for line, record in _records(path, reader, fmt):
        if len(record) < need:
            raise DataError(f"{path}:{line}: {len(record)} fields, column {need - 1} is used "
                            f"(task.header is false: columns are 0-based indices){_runs_on(reader, line)}")
        yield line, {str(i): value for i, value in enumerate(record)}


def _jsonl_rows(path: Path, text: str, columns: Sequence[str]) -> Iterator[tuple[int, dict]]:
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        missing = [c for c in columns if c not in row]
        if missing:
            raise DataError(f"{path}:{number}: no field {', '.join(repr(c) for c in missing)} (its fields: "
                            f"{', '.join(row)})")
        yield number, row


def _raw_examples(path: Path, cfg: TaskConfig, labelled: bool = True) -> list[tuple]:
    """(source, texts, raw label) of every record in one file; unlabelled: the label column is optional."""
    out = []
    columns = [*cfg.text_columns, cfg.label_column] if labelled else list(cfg.text_columns)
    for number, row in _rows(path, columns, cfg.header):
        texts = []
        for column in cfg.text_columns:
            value = row[column]
            if not isinstance(value, str):
                raise DataError(f"{path}:{number}: column {column!r} holds {type(value).__name__} {value!r}, "
                                f"not text")
            texts.append(value)
        if labelled and row[cfg.label_column] is None:
            raise DataError(f"{path}:{number}: the label ({cfg.label_column!r}) is null; every row of a train or "
                            f"dev file needs one")
        out.append((f"{path}:{number}", tuple(texts), row[cfg.label_column] if labelled else None))
    if not out:
        raise DataError(f"{path}: no examples (only a header)")
    return out


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _label_text(raw: object, source: str = "") -> str:
    """The class name a raw label stands for. Surrounding whitespace is dropped, and labels that are
    equal as numbers are one class: 1, "1", "1.0", "1 " and "+1e0" all name class "1" (a file that
    mixes them is common after a spreadsheet round trip; silently making three classes is not)."""
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    text = (raw if isinstance(raw, str) else json.dumps(raw)).strip()
    if not text:
        raise DataError(f"{source or 'task.labels'}: the label is empty")
    if _NUMBER.fullmatch(text):
        number = decimal.Decimal(text)
        if not -40 < number.adjusted() < 40:
            return text  # 1e999999999: int() would build a billion digits; no real class is named so
        if number == number.to_integral_value():
            return str(int(number))
        return str(number.normalize())
    return text


def _number_key(name: str):
    return decimal.Decimal(name) if _NUMBER.fullmatch(name) else None


def _sorted_labels(found: set[str]) -> list[str]:
    keys = {name: _number_key(name) for name in found}
    if all(key is not None for key in keys.values()):
        return sorted(found, key=keys.__getitem__)  # numeric labels in numeric order
    return sorted(found)


def _regression_target(source: str, raw: object) -> float:
    try:
        if isinstance(raw, bool):
            raise ValueError
        value = float(raw)
    except (TypeError, ValueError):
        raise DataError(f"{source}: regression label {raw!r} is not a number") from None
    if not math.isfinite(value):
        raise DataError(f"{source}: regression label {raw!r} is not a finite number")
    return value


def _to_examples(raw: list, cfg: TaskConfig, label_ids: dict[str, int]) -> list[Example]:
    examples = []
    for row, (source, texts, label, *index) in enumerate(raw):
        if label is None:  # an unlabelled (test) row: predict only
            examples.append(Example(texts, float("nan") if cfg.type == "regression" else -1, source,
                                    index[0] if index else row))
            continue
        if cfg.type == "regression":
            examples.append(Example(texts, _regression_target(source, label), source, index[0] if index else row))
            continue
        name = _label_text(label, source)
        if name not in label_ids:
            raise DataError(f"{source}: unknown label {name!r}; the task's labels are {', '.join(label_ids)}")
        examples.append(Example(texts, label_ids[name], source, index[0] if index else row))
    return examples


def load_task(cfg: TaskConfig, augmented: bool = False) -> TaskData:
    """Read and check the train (and, when given, dev) split of a task. `augmented` (stages 3-4): train
    is task.augmented_train_file when set; labels, dev and the selection hold-out still come from the task."""
    cfg = resolve_task(cfg)
    dev_raws: dict[str, list] = {}
    if cfg.dataset is not None:
        cfg, train_raw, dev_raws = _dataset_splits(cfg)
        dev_raw = next(iter(dev_raws.values()), [])
    else:
        train_raw = _raw_examples(Path(cfg.train_file), cfg)
        dev_raw = _raw_examples(Path(cfg.dev_file), cfg) if cfg.dev_file else []
    labels: list[str] = []
    if cfg.type == "classification":
        labels = [_label_text(name) for name in cfg.labels]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"task.labels: names repeat once whitespace is dropped and numbers compared as "
                              f"numbers: {cfg.labels}")
        labels = labels or _sorted_labels({_label_text(label, source) for source, _, label, *_ in train_raw})
        if len(labels) < 2:
            raise DataError(f"{cfg.train_file}: a classification task needs at least 2 classes, found {labels}")
    label_ids = {name: i for i, name in enumerate(labels)}
    dev_splits = {name: _to_examples(raw, cfg, label_ids) for name, raw in dev_raws.items()}
    train, selection = _hold_out(_to_examples(train_raw, cfg, label_ids), cfg.selection_split)
    if augmented and cfg.augmented_train_file is not None:
        # `augment` left the held-out selection examples out already: train on every row of its file
        cfg = dataclasses.replace(cfg, train_file=cfg.augmented_train_file)
        train = _to_examples(_augmented_raw(cfg), cfg, label_ids)
    return TaskData(name=cfg.name or Path(cfg.train_file).parent.name, type=cfg.type,
                    text_columns=list(cfg.text_columns), label_names=labels,
                    train=train, selection=selection,
                    dev=next(iter(dev_splits.values())) if dev_splits else _to_examples(dev_raw, cfg, label_ids),
                    max_seq_len=cfg.max_seq_len, train_file=cfg.train_file, dev_file=cfg.dev_file,
                    metric=cfg.metric,
                    dev_splits=dev_splits)


def _augmented_raw(cfg: TaskConfig) -> list[tuple]:
    path = Path(cfg.augmented_train_file)
    if not path.is_file():
        raise ConfigError(f"task.augmented_train_file: file not found: {path} (write it with "
                          f"`ernie-tiny-ds augment --config RECIPE --output {path}`, or unset the key)")
    return _raw_examples(path, cfg)


SELECTION_SEED = 20210604  # fixed: every rank, stage and run holds out the same examples


def _hold_out(train: list[Example], fraction: float | None) -> tuple[list[Example], list[Example]]:
    """(train, selection): `fraction` of train, drawn with a fixed seed, kept in file order."""
    if fraction is None:
        return train, []
    if not 0 < fraction < 1:
        raise ConfigError(f"task.selection_split must be a fraction in (0, 1), got {fraction}")
    count = int(round(fraction * len(train)))
    if not 0 < count < len(train):
        raise ConfigError(f"task.selection_split: {fraction} of {len(train)} train examples holds out {count}; "
                          f"choose a fraction that leaves examples on both sides")
    held = set(np.random.default_rng(SELECTION_SEED).permutation(len(train))[:count].tolist())
    return ([e for i, e in enumerate(train) if i not in held], [e for i, e in enumerate(train) if i in held])


def _dataset_splits(cfg: TaskConfig) -> tuple[TaskConfig, list, dict[str, list]]:
    """task.dataset's train and dev splits; the config completed from its features (columns, type,
    class names in the dataset's id order) and with `name: dataset[split]` where messages name a file."""
    dataset = open_dataset(cfg)
    train = get_split(dataset, cfg.train_split, "task.train_split")
    columns, kind, names = describe(train, cfg)
    devs = split_names(cfg.dev_split)
    cfg = dataclasses.replace(cfg, text_columns=columns, type=kind, labels=cfg.labels or names,
                              name=cfg.name or cfg.subset or Path(cfg.dataset).name,
                              train_file=f"{cfg.dataset}[{cfg.train_split}]",
                              dev_file=f"{cfg.dataset}[{devs[0]}]" if devs else None)
    main_metric(cfg.name, cfg.type, cfg.metric)  # the type may have come from the features
    train_raw = raw_split(train, cfg.train_split, cfg, columns, labelled=True)
    dev_raws = {name: raw_split(get_split(dataset, name, "task.dev_split"), name, cfg, columns, labelled=True)
                for name in devs}
    return cfg, train_raw, dev_raws


def load_split(cfg: TaskConfig, split: str) -> tuple[TaskData, list[Example]]:
    """The task and the examples of one more split, labels optional (what `predict` scores): a split
    name of task.dataset, or with files "train", "dev" or "test" (task.test_file)."""
    task = load_task(cfg)
    cfg = resolve_task(cfg)
    if cfg.dataset is not None:
        resolved = dataclasses.replace(cfg, text_columns=task.text_columns, type=task.type, labels=task.label_names)
        data = get_split(open_dataset(cfg), split, "--split")
        raw = raw_split(data, split, resolved, task.text_columns, labelled=False)
        return task, _to_examples(raw, resolved, {name: i for i, name in enumerate(task.label_names)})
    files = {"train": cfg.train_file, "dev": cfg.dev_file, "test": cfg.test_file}
    if split not in files:
        raise ConfigError(f"--split: with task files use train, dev or test, got {split!r}")
    if files[split] is None:
        raise ConfigError(f"--split {split}: set task.{split}_file")
    raw = _raw_examples(Path(files[split]), cfg, labelled=False)
    return task, _to_examples(raw, cfg, {})


# --------------------------------------------------------------------------- batches
def _tokenize(examples: Sequence[Example], tokenizer, max_seq_len: int, **kwargs):
    """[CLS] a [SEP] (b [SEP]) with token_type_ids, truncated longest-first."""
    first = [e.texts[0] for e in examples]
    second = [e.texts[1] for e in examples] if len(examples[0].texts) == 2 else None
    return tokenizer(first, second, truncation=True, max_length=max_seq_len, return_attention_mask=False, **kwargs)


def token_lengths(examples: Sequence[Example], tokenizer, max_seq_len: int) -> np.ndarray:
    """The length of each example as encode_batch makes it (special tokens in, truncated longest-first).

    Every rank measures all of train when it builds a loader, so this avoids the full encodings: each
    distinct text is counted once without special tokens (a pair's texts are tokenized separately
    anyway, and premises repeat: a third of the bundled coherence task's texts are repeats), then a
    row is min(max_seq_len, its texts' tokens + the special tokens), which is what longest-first
    truncation leaves."""
    if not examples:
        return np.zeros(0, dtype=np.int64)
    texts = list(dict.fromkeys(text for e in examples for text in e.texts))
    counts: dict[str, int] = {}
    encoder = TokenEncoder(tokenizer)
    for start in range(0, len(texts), LENGTH_CHUNK):
        part = texts[start:start + LENGTH_CHUNK]
        counts.update(zip(part, encoder.lengths(part)))
    special = tokenizer.num_special_tokens_to_add(pair=len(examples[0].texts) == 2)
    content = np.fromiter((sum(counts[text] for text in e.texts) for e in examples), np.int64, len(examples))
    return np.minimum(content + special, max_seq_len)


def encode_batch(examples: Sequence[Example], tokenizer, max_seq_len: int, task_type: str,
                 with_labels: bool) -> dict[str, torch.Tensor]:
    """Token ids, padded to the batch's longest example (see module doc), with token_type_ids."""
    enc = _tokenize(examples, tokenizer, max_seq_len, return_token_type_ids=True)
    width = max(len(ids) for ids in enc["input_ids"])
    input_ids = torch.full((len(examples), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    token_type_ids = torch.zeros_like(input_ids)
    for row, (ids, types) in enumerate(zip(enc["input_ids"], enc["token_type_ids"])):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
        token_type_ids[row, :len(ids)] = torch.tensor(types)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
    if with_labels:
        dtype = torch.float32 if task_type == "regression" else torch.long
        batch["labels"] = torch.tensor([e.label for e in examples], dtype=dtype)
    return batch


def length_sorted_batches(task: TaskData, tokenizer, examples: Sequence[Example], batch_size: int,
                          with_labels: bool) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """(positions in `examples`, batch) for batches of at most `batch_size` cut from `examples` sorted by
    length; whoever needs the examples' own order puts each output back at its positions."""
    lengths = token_lengths(examples, tokenizer, task.max_seq_len)
    order = np.argsort(lengths, kind="stable")
    for positions in _cut_sorted(order, lengths, batch_size):
        yield positions, encode_batch([examples[i] for i in positions], tokenizer, task.max_seq_len, task.type,
                                      with_labels)


def _cut_sorted(order: np.ndarray, lengths: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Batches of `order` (ascending lengths): a batch ends when full, or when the next example would
    make it pad more than MAX_SORTED_PADDING (short sentences: one token more is a large share)."""
    start, content = 0, 0
    for end, index in enumerate(order):
        rows, width = end - start + 1, int(lengths[index])  # the batch with this example: its widest row
        if rows > batch_size or width * rows - (content + width) > MAX_SORTED_PADDING * width * rows:
            yield order[start:end]
            start, content = end, 0
        content += int(lengths[index])
    if start < len(order):
        yield order[start:]


def iter_dev_batches(task: TaskData, tokenizer, batch_size: int,
                     examples: Sequence[Example] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """The dev split (or `examples`: another dev split), labels included, in length order: metrics pair
    each output with the label that came in its batch, so they do not depend on the order."""
    examples = task.dev if examples is None else examples
    if not examples:
        raise ConfigError(f"task.dev_file: task {task.name!r} has no dev split to evaluate on")
    for _, batch in length_sorted_batches(task, tokenizer, examples, batch_size, with_labels=True):
        yield batch


def length_grouped(order: np.ndarray, lengths: np.ndarray, unit: int, rng: np.random.Generator) -> np.ndarray:
    """`order` (a multiple of `unit` long) with each run of `unit` holding similar lengths: sort chunks of
    GROUP_BATCHES runs by length (stable: equal lengths stay shuffled), then shuffle the runs."""
    chunk = unit * GROUP_BATCHES
    chunks = np.split(order, range(chunk, len(order), chunk))
    parts = [part[np.argsort(lengths[part], kind="stable")] for part in chunks]
    runs = np.concatenate(parts).reshape(-1, unit)
    return runs[rng.permutation(len(runs))].reshape(-1)


def next_position(epoch: int, handed_out: int, per_epoch: int) -> tuple[int, int]:
    """(epoch, batch index) of the batch that follows `handed_out` batches of `epoch`."""
    return (epoch + 1, 0) if handed_out >= per_epoch else (epoch, handed_out)


class _Positions:
    """The DataLoader's sampler: every (epoch, batch index) from a saved position on, endlessly."""

    def __init__(self, epoch: int, handed_out: int, per_epoch: int):
        self.epoch, self.handed_out, self.per_epoch = epoch, handed_out, per_epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, handed_out = self.epoch, self.handed_out
        while True:
            epoch, index = next_position(epoch, handed_out, self.per_epoch)
            handed_out = index + 1
            yield epoch, index


class _PositionBatches(torch.utils.data.Dataset):
    """Runs inside a DataLoader worker: the batch at an (epoch, batch index). The order is a pure
    function of (seed, epoch), so any worker makes any batch, and the DataLoader hands them back in
    the sampler's order: the main process counts what it handed out, as without workers."""

    def __init__(self, loader: "TaskLoader"):
        self.loader = loader
        self._epoch, self._order = None, None   # this worker's latest epoch order

    def __getitem__(self, position: tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, index = position
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self.loader.epoch_order(epoch)
        return self.loader.batch_at(self._order, index)


class TaskLoader:
    """Endless shuffled train batches of one rank (the loader contract of data.contract), made in the
    training process or in `loading`'s DataLoader workers: the same batches either way."""

    def __init__(self, task: TaskData, tokenizer, batch_size: int, rank: int, world_size: int, seed: int,
                 with_labels: bool, loading: Loading = Loading()):
        self.task = task
        self.loading = loading
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.with_labels = with_labels
        self.batches_per_epoch = len(task.train) // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise DataError(f"{task.train_file}: {len(task.train)} examples do not fill one batch of {batch_size} "
                            f"on each of {world_size} rank(s); use a smaller micro_batch_size or more data")
        self.lengths = token_lengths(task.train, tokenizer, task.max_seq_len)
        self._epoch = 0
        self._batches_in_epoch = 0
        self._unsorted_epoch: int | None = None  # resumed from a position saved before length grouping

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The train examples of `epoch` in batch order (same on every rank): a seeded permutation, its
        tail that fills no global batch dropped, the rest length-grouped by global batch."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.task.train))
        if epoch == self._unsorted_epoch:  # finish that epoch in the order its first batches came in
            return order
        unit = self.batch_size * self.world_size
        return length_grouped(order[:self.batches_per_epoch * unit], self.lengths, unit, rng)

    def _indices(self, order: np.ndarray, batch: int) -> np.ndarray:
        start = (batch * self.world_size + self.rank) * self.batch_size
        return order[start:start + self.batch_size]

    def batch_at(self, order: np.ndarray, index: int) -> dict[str, torch.Tensor]:
        """This rank's batch `index` of an epoch whose order is `order`."""
        examples = [self.task.train[i] for i in self._indices(order, index)]
        return encode_batch(examples, self.tokenizer, self.task.max_seq_len, self.task.type, self.with_labels)

    def _hand_out(self) -> tuple[int, int]:
        """The next batch's (epoch, index), counted as handed out (what state_dict saves)."""
        epoch, index = next_position(self._epoch, self._batches_in_epoch, self.batches_per_epoch)
        self._epoch, self._batches_in_epoch = epoch, index + 1
        return epoch, index

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self.loading.num_workers > 0:
            positions = _Positions(self._epoch, self._batches_in_epoch, self.batches_per_epoch)
            for batch in worker_batches(_PositionBatches(self), self.loading, self.rank, sampler=positions):
                self._hand_out()
                yield batch
        made = _PositionBatches(self)
        while True:
            yield made[self._hand_out()]

    def state_dict(self) -> dict:
        return loader_state("task", epoch=self._epoch, batches_in_epoch=self._batches_in_epoch, rank=self.rank,
                            world_size=self.world_size, batch_size=self.batch_size, seed=self.seed,
                            num_examples=len(self.task.train), order=ORDER)

    def load_state_dict(self, state: dict) -> None:
        check_state(state, "task", world_size=self.world_size, batch_size=self.batch_size,
                    num_examples=len(self.task.train), seed=self.seed)
        self._epoch = int(state["epoch"])
        self._batches_in_epoch = int(state["batches_in_epoch"])
        self._unsorted_epoch = self._epoch if state.get("order") != ORDER else None


def build_task_loader(task_cfg: TaskConfig, tokenizer, batch_size: int, rank: int, world: int, seed: int,
                      with_labels: bool, augmented: bool = False, loading: Loading = Loading()) -> TaskLoader:
    """The train loader of the recipe's task (stages 3-4 and teacher finetuning); `augmented`: see load_task;
    `loading`: data.num_workers for the run's device (data/workers.py)."""
    return TaskLoader(load_task(task_cfg, augmented), tokenizer, batch_size, rank, world, seed, with_labels, loading)

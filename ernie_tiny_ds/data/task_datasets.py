"""Task splits from a `datasets` dataset (task.dataset): a folder written by save_to_disk, or a Hub
name opened with load_dataset (task.subset its configuration, e.g. glue/mnli).

The dataset's features describe the task: the text columns are its string features (unless
task.text_columns names them), a ClassLabel label column gives the class names in id order (so
predictions keep the dataset's ids), a float label column makes it a regression task. A label of
-1 (how GLUE's test splits mark a missing label) is no label.
"""
from __future__ import annotations

from pathlib import Path

from ..config import TaskConfig
from ..errors import ConfigError, DataError

INDEX_COLUMN = "idx"  # GLUE's example ids: the `index` of a submission file


def open_dataset(cfg: TaskConfig):
    """The DatasetDict of task.dataset (a lone Dataset counts as its train split)."""
    import datasets

    folder = Path(cfg.dataset).expanduser()
    if folder.is_dir() and cfg.subset and (folder / cfg.subset).is_dir():
        folder = folder / cfg.subset  # a save_to_disk folder per configuration
    try:
        if folder.is_dir() and ((folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()):
            loaded = datasets.load_from_disk(str(folder))
        else:
            loaded = datasets.load_dataset(cfg.dataset, cfg.subset)
    except (FileNotFoundError, ValueError, ConnectionError) as exc:
        raise ConfigError(f"task.dataset: cannot open {cfg.dataset!r}"
                          f"{f' (subset {cfg.subset!r})' if cfg.subset else ''}: {exc}") from None
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def split_names(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def get_split(dataset, name: str, key: str):
    if name not in dataset:
        raise ConfigError(f"{key}: the dataset has no split {name!r} (its splits: {', '.join(dataset)})")
    return dataset[name]


def describe(split, cfg: TaskConfig) -> tuple[list[str], str, list[str]]:
    """(text columns, task type, class names in id order) that the split's features give."""
    from datasets import ClassLabel, Value

    features = split.features
    label = str(cfg.label_column)
    if label not in features:
        raise ConfigError(f"task.label_column: the dataset has no column {label!r} (its columns: "
                          f"{', '.join(features)})")
    columns = [str(c) for c in cfg.text_columns] or [
        name for name, feature in features.items()
        if name != label and isinstance(feature, Value) and feature.dtype in ("string", "large_string")]
    missing = [c for c in columns if c not in features]
    if missing:
        raise ConfigError(f"task.text_columns: the dataset has no column {', '.join(map(repr, missing))} "
                          f"(its columns: {', '.join(features)})")
    if not 1 <= len(columns) <= 2:
        raise ConfigError(f"task.text_columns: the dataset has text columns {columns}; name one (single "
                          f"sentence) or two (sentence pair)")
    feature = features[label]
    if isinstance(feature, ClassLabel):
        if cfg.type == "regression":
            raise ConfigError(f"task.type: regression, but the dataset's {label!r} is a class label "
                              f"({', '.join(feature.names)})")
        return columns, "classification", list(feature.names)
    if isinstance(feature, Value) and feature.dtype.startswith("float"):
        return columns, "regression", []
    return columns, cfg.type, []


def raw_split(split, name: str, cfg: TaskConfig, columns: list[str], labelled: bool) -> list[tuple]:
    """(source, texts, raw label or None, index) of every row, as data/tasks.py reads files."""
    from datasets import ClassLabel

    label = str(cfg.label_column)
    feature = split.features.get(label)
    has_label = feature is not None
    indices = split[INDEX_COLUMN] if INDEX_COLUMN in split.column_names else range(len(split))
    texts = [split[c] for c in columns]
    labels = split[label] if has_label else [None] * len(split)
    where = f"{cfg.dataset}[{name}]"
    out = []
    for row, (index, raw) in enumerate(zip(indices, labels)):
        source = f"{where}:{row}"
        values = tuple(t[row] for t in texts)
        for column, value in zip(columns, values):
            if not isinstance(value, str):
                raise DataError(f"{source}: column {column!r} holds {type(value).__name__} {value!r}, not text")
        if raw is not None and isinstance(feature, ClassLabel):
            raw = None if raw < 0 else feature.int2str(int(raw))  # -1: GLUE's unlabelled test rows
        if raw is None and labelled:
            raise DataError(f"{source}: the label is missing (split {name!r} is not labelled)")
        out.append((source, values, raw, int(index)))
    if not out:
        raise DataError(f"{where}: the split has no examples")
    return out

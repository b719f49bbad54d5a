"""Main metrics of tasks: the official one of GLUE and CLUE tasks by name, a recipe's `task.metric`.

GLUE reports CoLA as Matthews correlation, MRPC and QQP as the mean of accuracy and F1, STS-B as the
mean of Pearson and Spearman, every other task (MNLI matched/mismatched included) as accuracy; the
CLUE classification tasks report accuracy. A task of another name is scored by accuracy
(classification) or Pearson (regression) unless `task.metric` says otherwise. compute_metrics
computes them (the evaluate command, the report and stage 4's best-checkpoint selection use it).
"""
from __future__ import annotations

import math
import warnings

import numpy as np

from ..errors import ConfigError

CLASSIFICATION_METRICS = ("accuracy", "f1", "mcc", "acc_f1")
REGRESSION_METRICS = ("pearson", "spearman", "pearson_spearman")
COMPOSITES = {"acc_f1": ("accuracy", "f1"), "pearson_spearman": ("pearson", "spearman")}  # means of two
DEFAULT_METRIC = {"classification": "accuracy", "regression": "pearson"}

OFFICIAL_METRIC = {
    # GLUE
    "cola": "mcc", "sst2": "accuracy", "mrpc": "acc_f1", "qqp": "acc_f1", "stsb": "pearson_spearman",
    "mnli": "accuracy", "mnlimatched": "accuracy", "mnlimismatched": "accuracy", "ax": "mcc",
    "qnli": "accuracy", "rte": "accuracy", "wnli": "accuracy",
    # CLUE
    "afqmc": "accuracy", "tnews": "accuracy", "iflytek": "accuracy", "cmnli": "accuracy", "ocnli": "accuracy",
    "wsc": "accuracy", "cluewsc2020": "accuracy", "csl": "accuracy", "chnsenticorp": "accuracy",
}


def benchmark_key(name: str | None) -> str:
    """A task name as the tables above spell it: SST-2, sst_2 and sst2 are one task."""
    return "".join(c for c in (name or "").lower() if c.isalnum())


def metrics_for(task_type: str) -> tuple[str, ...]:
    return CLASSIFICATION_METRICS if task_type == "classification" else REGRESSION_METRICS


def main_metric(task_name: str | None, task_type: str, configured: str | None = None) -> str:
    """`task.metric` when set, else the task's official metric when its name is a GLUE/CLUE task of
    the same kind, else accuracy (classification) or Pearson (regression)."""
    if configured is not None:
        if configured not in metrics_for(task_type):
            raise ConfigError(f"task.metric: {configured!r} does not score a {task_type} task; choose one of "
                              f"{', '.join(metrics_for(task_type))}")
        return configured
    official = OFFICIAL_METRIC.get(benchmark_key(task_name))
    if official in metrics_for(task_type):
        return official
    return DEFAULT_METRIC[task_type]


# GLUE submissions: one TSV per task under these names; CoLA, SST-2, MRPC, QQP and WNLI are
# scored on class ids (0/1), STS-B on numbers, the NLI tasks on label names
SUBMISSION_NAME = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "qqp": "QQP", "stsb": "STS-B", "mnli": "MNLI",
                   "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI", "ax": "AX"}
SPLIT_SUFFIX = {"testmatched": "-m", "testmismatched": "-mm", "validationmatched": "-m",
                "validationmismatched": "-mm"}
SUBMITS_CLASS_IDS = {"cola", "sst2", "mrpc", "qqp", "wnli"}


def submission_file(task_name: str | None, split: str, several: bool) -> str:
    """`CoLA.tsv`, `MNLI-m.tsv`, …; another task: `<name>.tsv`, or `<name>-<split>.tsv` among several splits."""
    key = benchmark_key(task_name)
    base = SUBMISSION_NAME.get(key, task_name or "task")
    suffix = SPLIT_SUFFIX.get(benchmark_key(split), f"-{split}" if several else "")
    return f"{base}{suffix}.tsv"


def submits_class_ids(task_name: str | None) -> bool:
    return benchmark_key(task_name) in SUBMITS_CLASS_IDS


# --------------------------------------------------------------------------- computing them
def _finite_or_none(value: float) -> float | None:
    # constant predictions make correlations undefined: report null, not NaN (invalid JSON)
    value = float(value)
    return value if math.isfinite(value) else None


def compute_metrics(task_type: str, logits: np.ndarray, labels: np.ndarray,
                    main: str | None = None) -> dict[str, float | None]:
    """Metrics of [N, num_labels] logits (or [N] / [N, 1] regression outputs) against gold labels;
    with `main` a composite (acc_f1, pearson_spearman: GLUE's means of two), that one too."""
    metrics = _base_metrics(task_type, logits, labels)
    if main in COMPOSITES:
        parts = [metrics[name] for name in COMPOSITES[main]]
        metrics[main] = None if None in parts else float(np.mean(parts))
    return metrics


def _base_metrics(task_type: str, logits: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if task_type == "regression":
        from scipy.stats import pearsonr, spearmanr

        predictions = logits.reshape(len(labels))
        with warnings.catch_warnings():  # constant input: the result is NaN, reported as null
            warnings.simplefilter("ignore")
            return {"pearson": _finite_or_none(pearsonr(predictions, labels)[0]),
                    "spearman": _finite_or_none(spearmanr(predictions, labels)[0])}
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    predictions = logits.argmax(axis=-1)
    num_labels = logits.shape[-1]
    f1 = f1_score(labels, predictions, average="binary" if num_labels == 2 else "macro", zero_division=0)
    return {"accuracy": float(accuracy_score(labels, predictions)), "f1": float(f1),
            "mcc": float(matthews_corrcoef(labels, predictions))}

"""Main metrics of tasks: the official one of GLUE and CLUE tasks by name, a recipe's `task.metric`.

GLUE reports CoLA as Matthews correlation, MRPC and QQP as the mean of accuracy and F1, STS-B as the
mean of Pearson and Spearman, every other task (MNLI matched/mismatched included) as accuracy; the
CLUE classification tasks report accuracy. A task of another name is scored by accuracy
(classification) or Pearson (regression) unless `task.metric` says otherwise.
"""
from __future__ import annotations

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

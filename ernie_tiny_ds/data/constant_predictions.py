"""A model that gives every dev row the same answer: a score can hide it, the user must be told.

A 3-class student that predicts one class for all 735 dev rows scores a third of the rows right, and
a regression student stuck on its plateau predicts the labels' mean for every row: both come back
looking like weak models, not broken ones. The check runs on the dev predictions every evaluation
already computes, and its line names what usually causes it.
"""
from __future__ import annotations

import numpy as np

KEY = "constant_prediction"  # the metrics entry that carries the diagnosis (absent when there is none)
# a regression model whose predictions spread less than this share of the labels' spread predicts the
# mean: the hard-label MSE plateau at the labels' variance (BENCHMARKS 2) sits at about 0.1 %
REGRESSION_SPREAD = 0.01
LIKELY_FIXES = ("likely fixes: more task-specific steps (stages.task_specific.train.max_steps), a lower optim.lr, "
                "a larger losses.soft_label weight, or a teacher that itself beats a constant (check its dev score)")


def constant_prediction(task_type: str, logits: np.ndarray, labels: np.ndarray,
                        label_names: list[str] | None = None) -> str | None:
    """One line when the model predicts the same for every row while the gold labels vary, else None."""
    labels = np.asarray(labels)
    if len(labels) < 2 or len(np.unique(labels)) < 2:
        return None  # a dev set of one answer cannot tell a constant model from a right one
    logits = np.asarray(logits, dtype=np.float64)
    if task_type == "regression":
        predictions = logits.reshape(len(labels))
        if predictions.std() > REGRESSION_SPREAD * labels.astype(np.float64).std():
            return None
        what = f"about {predictions.mean():.4g} (spread {predictions.std():.2g}, the labels' {labels.std():.2g})"
    else:
        classes = np.unique(logits.argmax(axis=-1))
        if len(classes) > 1:
            return None
        index = int(classes[0])
        what = f"class {label_names[index]!r}" if label_names and index < len(label_names) else f"class {index}"
    return f"constant predictions: the model predicts {what} for all {len(labels)} dev rows; {LIKELY_FIXES}"

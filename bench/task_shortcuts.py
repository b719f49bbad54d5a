"""How much of a task can be solved without reading the two sentences together? Shallow baselines
for the bundled tasks, scored on dev by the task's main metric.

A pair task only tests what distillation should transfer (relating two sentences) when these
baselines stay well below the teacher. BENCHMARKS §2 uses them to say which bundled tasks can
separate the ablation's variants: `pair` is solved from its second sentence alone.

  <column> only   a bag of words of one text column (multinomial naive Bayes for classification,
                  ridge regression for regression): the task read one sentence at a time
  both bags       both columns' bags side by side: every word, but no comparison between them
  shared words    one feature, the count of distinct lowercased words the two texts share
                  (logistic regression / a straight line): the simplest comparison

    python bench/task_shortcuts.py [--tasks pair similarity coherence sentiment]

Needs only the CPU and a few seconds; scikit-learn comes with the project's dependencies.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def words(text: str) -> list[str]:
    return text.lower().split()


def shared_words(texts: tuple[str, ...]) -> int:
    return len(set(words(texts[0])) & set(words(texts[1])))


def both_bags(texts: tuple[str, ...]) -> str:
    """The two texts as one document whose words are tagged by column (`0:cat 1:cat`)."""
    return " ".join(f"{column}:{word}" for column, text in enumerate(texts) for word in words(text))


def bag_model(task_type: str):
    from sklearn.feature_extraction.text import CountVectorizer
    from sklearn.linear_model import Ridge
    from sklearn.naive_bayes import MultinomialNB
    from sklearn.pipeline import make_pipeline

    head = MultinomialNB(alpha=1.0) if task_type == "classification" else Ridge(alpha=1.0)
    return make_pipeline(CountVectorizer(lowercase=True, token_pattern=r"\S+"), head)


def scores(model, train_x, train_y, dev_x, task_type: str) -> np.ndarray:
    """Fits on train; returns dev 'logits' in the shape compute_metrics takes."""
    model.fit(train_x, train_y)
    return model.predict_proba(dev_x) if task_type == "classification" else model.predict(dev_x)


def baselines(task) -> dict[str, np.ndarray]:
    from sklearn.linear_model import LinearRegression, LogisticRegression

    train_y = np.array([example.label for example in task.train])

    def fit(model, feature) -> np.ndarray:  # `feature`: an example's texts -> the model's input
        return scores(model, [feature(e.texts) for e in task.train], train_y, [feature(e.texts) for e in task.dev],
                      task.type)

    rows = {f"{name} only": fit(bag_model(task.type), lambda texts, c=column: texts[c])
            for column, name in enumerate(task.text_columns)}
    if len(task.text_columns) == 2:
        rows["both bags"] = fit(bag_model(task.type), both_bags)
        line = LogisticRegression(max_iter=1000) if task.type == "classification" else LinearRegression()
        rows["shared words"] = fit(line, lambda texts: [shared_words(texts)])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["pair", "similarity", "coherence", "sentiment"])
    args = parser.parse_args()

    from ernie_tiny_ds.config import TaskConfig
    from ernie_tiny_ds.data.benchmarks import compute_metrics
    from ernie_tiny_ds.data.tasks import load_task

    print("| task (dev, main metric) | baseline | score |\n|---|---|---|")
    for name in args.tasks:
        task = load_task(TaskConfig(name=name))
        dev_y = np.array([example.label for example in task.dev])
        metric = task.main_metric
        for baseline, logits in baselines(task).items():
            value = compute_metrics(task.type, logits, dev_y, metric)[metric]
            print(f"| {name} ({len(task.train)} train / {len(task.dev)} dev, {metric}) | {baseline} | "
                  f"{'undefined' if value is None else f'{value:.4f}'} |")


if __name__ == "__main__":
    main()

"""Task metrics of an exported Hugging Face model on the task's dev split.

Classification: accuracy, F1 (binary for 2 classes, else macro) and Matthews correlation;
regression: Pearson and Spearman correlation (scikit-learn / scipy compute them); plus the task's
main metric when it is one of GLUE's means (acc_f1, pearson_spearman; data/benchmarks.py).
    ernie-tiny-ds evaluate --model DIR --task sentiment
    ernie-tiny-ds evaluate --model DIR --config RECIPE [task.dev_file=...] [--output metrics.json]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch
import transformers

from ..config import TaskConfig, apply_overrides, load_recipe, load_section
from ..data.benchmarks import compute_metrics
from ..data.constant_predictions import KEY as CONSTANT
from ..data.constant_predictions import constant_prediction
from ..data.tasks import TaskData, iter_dev_batches, load_task
from ..data.tokenizer import check_vocab_matches, load_tokenizer
from ..errors import ConfigError, UserError
from ..files import atomic_write_text
from ..outputs import claim_file, task_inputs

_GENERIC_LABEL = re.compile(r"LABEL_\d+")


def predict(model, batches) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) of a model over batches, dropout off, no gradients."""
    model.eval()
    logits, labels = [], []
    device = next(model.parameters()).device
    with torch.no_grad():
        for batch in batches:
            out = model(**{k: v.to(device) for k, v in batch.items() if k != "labels"})
            logits.append(out.logits.float().cpu())
            labels.append(batch["labels"])
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def evaluate_on_task(model, tokenizer, task: TaskData, batch_size: int = 64) -> dict[str, float | str | None]:
    """Dev metrics; with constant_predictions.KEY (one line) when the model gives every row one answer."""
    logits, labels = predict(model, iter_dev_batches(task, tokenizer, batch_size))
    metrics: dict = compute_metrics(task.type, logits, labels, task.main_metric)
    constant = constant_prediction(task.type, logits, labels, task.label_names)
    if constant is not None:
        metrics[CONSTANT] = constant
    for name, examples in list(task.dev_splits.items())[1:]:  # the first is task.dev
        # more dev splits (MNLI's mismatched): their main metric beside the first split's metrics
        logits, labels = predict(model, iter_dev_batches(task, tokenizer, batch_size, examples))
        metrics[f"{name}/{task.main_metric}"] = compute_metrics(task.type, logits, labels,
                                                                task.main_metric)[task.main_metric]
    return metrics


def check_model_fits_task(config, task: TaskData, where: str) -> None:
    """The model must have a sequence-classification head with the task's labels in the task's order."""
    architectures = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise UserError(f"{where}: the model has no sequence-classification head (architectures: "
                        f"{', '.join(architectures) or 'none'}); evaluate a finetuned teacher or a student from "
                        f"the task_specific stage")
    if config.num_labels != task.num_labels:
        classes = f": {', '.join(task.label_names)}" if task.label_names else ""
        raise UserError(f"{where}: the model has {config.num_labels} output(s), task {task.name!r} needs "
                        f"{task.num_labels} ({task.type}{classes})")
    names = [config.id2label[i] for i in range(config.num_labels)]
    if task.type == "classification" and not all(_GENERIC_LABEL.fullmatch(str(n)) for n in names) \
            and names != task.label_names:
        raise UserError(f"{where}: the model's labels {names} differ from the task's {task.label_names} "
                        f"(same classes in the same id order are needed)")
    if task.max_seq_len > config.max_position_embeddings:
        raise ConfigError(f"task.max_seq_len ({task.max_seq_len}) exceeds the model's "
                          f"max_position_embeddings ({config.max_position_embeddings})")


def load_classifier(model_dir: str | os.PathLike, task: TaskData):
    """(model, tokenizer) of an exported folder, checked against the task; never runs remote code."""
    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise UserError(f"--model: {folder} is not a Hugging Face model folder (no config.json)")
    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)
    check_model_fits_task(config, task, str(folder))
    tokenizer = load_tokenizer(str(folder), key="--model")
    check_vocab_matches(tokenizer, config.vocab_size, str(folder))
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=False)
    return model.eval(), tokenizer


def training_rows_score(model, tokenizer, task: TaskData, rows: int, batch_size: int = 64) -> tuple[float, int]:
    """(main metric, rows scored) of a loaded model on `rows` rows of the train split, taken at an even
    stride (a train file sorted by label or source still gives every part of it)."""
    examples = task.train[::max(1, len(task.train) // rows)][:rows]
    logits, labels = predict(model, iter_dev_batches(task, tokenizer, batch_size, examples))
    return compute_metrics(task.type, logits, labels, task.main_metric)[task.main_metric], len(examples)


def dev_metrics(model, tokenizer, task: TaskData, batch_size: int = 64) -> dict:
    """Dev-split metrics of a loaded model, plus the number of dev examples."""
    return {**evaluate_on_task(model, tokenizer, task, batch_size), "examples": len(task.dev)}


def evaluate_model(model_dir: str | os.PathLike, task_cfg: TaskConfig, batch_size: int = 64) -> dict:
    """Dev-split metrics of an exported model, plus the number of dev examples."""
    task = load_task(task_cfg)
    return dev_metrics(*load_classifier(model_dir, task), task, batch_size)


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="exported Hugging Face folder with a classification head")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", help="a bundled task name (sentiment, pair, similarity, coherence)")
    source.add_argument("--config", help="YAML recipe: its task section is evaluated")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--output", help="also write the metrics to this JSON file")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides (task.*)")


def task_from_args(args) -> TaskConfig:
    if args.config is not None:
        return load_recipe(args.config, args.overrides).task
    values = apply_overrides({"task": {"name": args.task}}, args.overrides)
    others = sorted(set(values) - {"task"})
    if others:
        raise ConfigError(f"with --task only task.* overrides apply, got {', '.join(others)}")
    return load_section(TaskConfig, values["task"], "task")


def run(args) -> int:
    if args.batch_size <= 0:
        raise ConfigError(f"--batch-size must be > 0, got {args.batch_size}")
    task_cfg = task_from_args(args)
    if args.output:  # before the evaluation: a wrong --output costs nothing
        claim_file(args.output, "--output", {"--model": args.model, **task_inputs(task_cfg)})
    metrics = {"model": str(args.model), "task": task_cfg.name or task_cfg.train_file,
               **evaluate_model(args.model, task_cfg, args.batch_size)}
    text = json.dumps(metrics, indent=1)
    print(text, flush=True)
    if CONSTANT in metrics:
        print(f"warning: {metrics[CONSTANT]}", file=sys.stderr, flush=True)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.output), text + "\n")
    return 0

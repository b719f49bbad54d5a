"""Predictions of an exported model on a task split, in GLUE's submission format: one TSV per task
and split (`index<TAB>prediction`, a header row), named as GLUE expects (CoLA.tsv, MNLI-m.tsv, …).

Classification writes label names (MNLI, QNLI, RTE: `entailment`, …), except for the GLUE tasks
scored on class ids (CoLA, SST-2, MRPC, QQP, WNLI: 0/1); regression writes numbers (STS-B). The
index is the dataset's `idx` column when it has one, else the row number.
    ernie-tiny-ds predict --model DIR --config RECIPE [--split test [--split …]] [--output DIR]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ..data.benchmarks import submission_file, submits_class_ids
from ..data.task_datasets import split_names
from ..data.tasks import length_sorted_batches, load_split
from ..errors import ConfigError
from ..files import atomic_write_text
from ..outputs import claim_output, marker_kind, task_inputs, write_marker
from .evaluate import load_classifier, task_from_args

PREDICTIONS = "predictions"  # the marker kind of a folder of submission files


def predict_outputs(model, tokenizer, task, examples, batch_size: int) -> np.ndarray:
    """[N, num_labels] outputs of the model on `examples` (in order), dropout off; batched by length."""
    outputs = torch.zeros(len(examples), model.config.num_labels)
    with torch.no_grad():
        for positions, batch in length_sorted_batches(task, tokenizer, examples, batch_size, with_labels=False):
            outputs[torch.from_numpy(positions)] = model(**batch).logits.float()
    return outputs.numpy()


def submission_text(task, examples, outputs: np.ndarray) -> str:
    lines = ["index\tprediction"]
    if task.type == "regression":
        values = [f"{float(v):.6g}" for v in outputs.reshape(len(examples))]
    else:
        ids = outputs.argmax(axis=-1)
        values = [str(int(i)) for i in ids] if submits_class_ids(task.name) else [task.label_names[i] for i in ids]
    lines += [f"{example.index}\t{value}" for example, value in zip(examples, values)]
    return "\n".join(lines) + "\n"


def write_predictions(model_dir, task_cfg, splits: list[str], output: Path, batch_size: int = 64) -> list[Path]:
    written = []
    model = tokenizer = None
    for split in splits:
        task, examples = load_split(task_cfg, split)
        if model is None:
            model, tokenizer = load_classifier(model_dir, task)
        text = submission_text(task, examples, predict_outputs(model, tokenizer, task, examples, batch_size))
        if not output.is_dir():
            output.mkdir(parents=True)
        if marker_kind(output) != PREDICTIONS:  # a later predict may write here again
            write_marker(output, PREDICTIONS)
        path = atomic_write_text(output / submission_file(task.name, split, len(splits) > 1), text)
        print(f"predict: {len(examples)} predictions for {task.name} [{split}] -> {path}", flush=True)
        written.append(path)
    return written


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="exported Hugging Face folder with a classification head")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", help="a bundled task name (sentiment, pair, similarity, coherence)")
    source.add_argument("--config", help="YAML recipe: its task section is predicted")
    parser.add_argument("--split", action="append", default=None,  # repeatable: --split a --split b
                        help="a split to predict, repeatable (default: task.test_split; with task files: train, "
                             "dev or test)")
    parser.add_argument("--output", default="predictions", help="folder for the TSV files (default: predictions)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides (task.*)")


def run(args) -> int:
    if args.batch_size <= 0:
        raise ConfigError(f"--batch-size must be > 0, got {args.batch_size}")
    task_cfg = task_from_args(args)
    splits = args.split or (split_names(task_cfg.test_split) if task_cfg.dataset is not None else ["test"])
    output = claim_output(args.output, PREDICTIONS, "--output", {"--model": args.model, **task_inputs(task_cfg)})
    write_predictions(args.model, task_cfg, splits, output, args.batch_size)
    return 0

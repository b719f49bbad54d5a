"""Best-checkpoint selection in the task-specific stage: every train.eval_every steps (and at the
last step) the student is scored on the selection set (task.selection_split held out of train, else
the dev split) by the task's main metric; a better score than any before exports the student to
OUT/task_specific/student_best/ (with best.json: step, score, metric, split).

Every rank scores its share of the examples (rank r takes examples r, r + world, …) and the
predictions are gathered on every rank (a control-plane collective), so all ranks compute the same
score and agree on whether it is the best. Each rank runs the same number of forward passes (a
rank with fewer examples repeats its last batch and drops the result), which ZeRO-3's parameter
gathering needs. The best score survives a resume: it is read back from best.json.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..data.benchmarks import compute_metrics
from ..data.tasks import encode_batch, load_task
from ..files import atomic_write_text, replace_dir, temp_dir_beside
from .collectives import all_gather_objects

BEST_DIR = "student_best"
BEST_FILE = "best.json"
EVAL_BATCH = 32


def read_best(folder: Path) -> dict | None:
    path = folder / BEST_FILE
    return json.loads(path.read_text()) if path.is_file() else None


class BestCheckpoint:
    """after_step(step): score and maybe export (collective: every rank calls it at every step)."""

    def __init__(self, r, parts, out_dir: Path, rank: int, world: int, dev: torch.device, zero: int):
        task = load_task(r.task)
        self.split = "selection" if task.selection else (next(iter(task.dev_splits), None) or "dev")
        examples = task.selection or task.dev
        if not examples:
            from ..errors import ConfigError
            raise ConfigError("train.eval_every: the task has no dev split (task.dev_file / task.dev_split) and no "
                              "task.selection_split to pick the best checkpoint on")
        self.task, self.parts, self.rank, self.world, self.dev, self.zero = task, parts, rank, world, dev, zero
        self.every, self.last_step = r.train.eval_every, r.train.max_steps
        self.mine = list(range(rank, len(examples), world))
        self.examples = examples
        self.batches = math.ceil(math.ceil(len(examples) / world) / EVAL_BATCH)  # equal on every rank
        self.folder = out_dir / BEST_DIR
        best = read_best(self.folder)
        self.best_score = best["score"] if best is not None else None
        self.max_seq_len = task.max_seq_len

    def _local_outputs(self) -> list[tuple[int, list[float]]]:
        student, module = self.parts.student, self.parts.engine.module
        module.eval()
        out: list[tuple[int, list[float]]] = []
        with torch.no_grad():
            for b in range(self.batches):
                ids = self.mine[b * EVAL_BATCH:(b + 1) * EVAL_BATCH]
                real = bool(ids)
                ids = ids or self.mine[-EVAL_BATCH:] or [0]  # a filler pass keeps ranks in step
                batch = encode_batch([self.examples[i] for i in ids], self.parts.tokenizer, self.max_seq_len,
                                     self.task.type, with_labels=False)
                logits = student(**{k: v.to(self.dev) for k, v in batch.items()}).logits.float().cpu()
                if real:
                    out += [(i, row.tolist()) for i, row in zip(ids, logits)]
        self.parts.objective.capture.pop()  # the capture hooks kept this forward's features: drop them
        module.train()
        return out

    def score(self) -> float | None:
        rows = sorted(row for share in all_gather_objects(self._local_outputs()) for row in share)
        logits = np.array([values for _, values in rows])
        labels = np.array([self.examples[i].label for i, _ in rows])
        main = self.task.main_metric
        return compute_metrics(self.task.type, logits, labels, main)[main]

    def __call__(self, step: int) -> None:
        if step % self.every and step != self.last_step:
            return
        score = self.score()
        better = score is not None and (self.best_score is None or score > self.best_score)
        if self.rank == 0:
            print(f"eval step {step}: {self.split} {self.task.main_metric} "
                  f"{'undefined' if score is None else f'{score:.4f}'}"
                  f"{' (best so far)' if better else ''}", flush=True)
        if better:
            self.best_score = score
            self.export(step, score)

    def export(self, step: int, score: float) -> None:
        """Write the live student to student_best/ (rank 0; collective under ZeRO-3: parameters gathered)."""
        import deepspeed

        student = self.parts.student
        gather = deepspeed.zero.GatheredParameters(list(student.parameters())) if self.zero == 3 \
            else contextlib.nullcontext()
        with gather:
            state = {k: v.detach().float().cpu().clone() for k, v in student.state_dict().items()} \
                if self.rank == 0 else None
        if self.rank != 0:
            return
        model = type(student)(student.config)
        model.load_state_dict(state, strict=True)
        tmp = temp_dir_beside(self.folder)
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            self.parts.tokenizer.save_pretrained(tmp)
            atomic_write_text(tmp / BEST_FILE, json.dumps({"step": step, "score": score, "metric":
                                                           self.task.main_metric, "split": self.split}))
            replace_dir(tmp, self.folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def best_checkpoint_hook(r, spec, parts, out_dir: Path, rank: int, world: int, dev: torch.device,
                         zero: int) -> Callable[[int], None] | None:
    """The after-step hook of a stage: best-checkpoint selection in a stage with a task head when
    train.eval_every is set, else None."""
    if not spec.labels or r.train.eval_every is None:
        return None
    return BestCheckpoint(r, parts, out_dir, rank, world, dev, zero)


def ship_choice(recipe) -> str:
    """task.ship, else best when the task-specific stage evaluates (train.eval_every), else last."""
    return recipe.task.ship or ("best" if recipe.for_stage("task_specific").train.eval_every else "last")


def shipped_student(recipe, out: Path) -> Path:
    """The task-specific student the pipeline ships: student_best/ when chosen and written, else student/."""
    best = Path(out) / "task_specific" / BEST_DIR
    if ship_choice(recipe) == "best" and (best / "config.json").is_file():
        return best
    return Path(out) / "task_specific" / "student"

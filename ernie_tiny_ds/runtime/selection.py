"""Best-checkpoint selection, shared by the task-specific stage and teacher finetuning: every
`eval_every` steps (and at the last step) the model is scored on the selection set
(task.selection_split held out of train, else the dev split) by the task's main metric; a better
score than any before exports the model to its best folder (with best.json: step, score, metric,
split): OUT/task_specific/student_best/ in stage 4, OUT/teacher_finetuned_best/ in finetuning.

Every rank scores its share of the examples (rank r takes examples r, r + world, …) and the
predictions are gathered on every rank (a control-plane collective), so all ranks compute the same
score and agree on whether it is the best. Each rank runs the same number of forward passes (a
rank with fewer examples repeats its last batch and drops the result), which ZeRO-3's parameter
gathering needs. The best score survives a resume: rank 0 reads it back from best.json and every
rank takes its value.
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.benchmarks import compute_metrics
from ..data.tasks import TaskData, encode_batch, load_task
from ..errors import ConfigError
from ..files import atomic_write_text, remove_stale_temps, replace_dir, temp_dir_beside
from ..stages import shipping_stage
from .collectives import all_gather_objects, broadcast_object

BEST_DIR = "student_best"
BEST_FILE = "best.json"
EVAL_BATCH = 32


def read_best(folder: Path) -> dict | None:
    path = Path(folder) / BEST_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def full_state_dict(module: torch.nn.Module, zero: int, rank: int) -> dict[str, torch.Tensor] | None:
    """fp32 CPU weights of a trained module on rank 0 (collective: ZeRO-3 parameters are gathered)."""
    import deepspeed  # not at the top: the CLI's parsing imports this module (see process_group.init_distributed)

    gather = deepspeed.zero.GatheredParameters(list(module.parameters())) if zero == 3 \
        else contextlib.nullcontext()
    with gather:
        if rank != 0:
            return None
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


@dataclass(frozen=True)
class Ranks:
    """Where this rank runs: its number, the world, its device and the engine's ZeRO stage (3: the
    parameters are gathered to export them)."""
    rank: int
    world: int
    device: torch.device
    zero: int


@dataclass(frozen=True)
class EvalPlan:
    """What to score and when: the task's selection set (else dev) every `every` steps and at
    `last_step`; `key` is the recipe key an error names."""
    task: TaskData
    every: int
    last_step: int
    key: str = "train.eval_every"


class Selector:
    """Scores `model` and exports the best to `folder`; call it after every optimizer step on every
    rank (collective). `resumed=False` forgets a best folder left by an earlier run (rank 0 removes it)."""

    def __init__(self, model: torch.nn.Module, tokenizer, folder: Path, plan: EvalPlan, ranks: Ranks,
                 resumed: bool = True):
        task = plan.task
        self.split = "selection" if task.selection else (next(iter(task.dev_splits), None) or "dev")
        self.examples = task.selection or task.dev
        if not self.examples:
            raise ConfigError(f"{plan.key}: the task has no dev split (task.dev_file / task.dev_split) and no "
                              "task.selection_split to pick the best checkpoint on")
        self.task, self.model, self.tokenizer, self.folder = task, model, tokenizer, Path(folder)
        self.every, self.last_step = plan.every, plan.last_step
        self.rank, self.dev, self.zero = ranks.rank, ranks.device, ranks.zero
        self.mine = list(range(ranks.rank, len(self.examples), ranks.world))
        self.batches = math.ceil(math.ceil(len(self.examples) / ranks.world) / EVAL_BATCH)  # equal on every rank
        best = read_best(self.folder) if ranks.rank == 0 and resumed else None
        self.best_score = broadcast_object(best["score"] if best is not None else None)  # one value on all ranks
        if ranks.rank == 0 and not resumed:  # after the collective: every rank has looked at the folder by now
            shutil.rmtree(self.folder, ignore_errors=True)  # a fresh run never ships an earlier run's best

    def _local_outputs(self) -> list[tuple[int, list[float]]]:
        was_training = self.model.training
        self.model.eval()
        out: list[tuple[int, list[float]]] = []
        with torch.no_grad():
            for b in range(self.batches):
                ids = self.mine[b * EVAL_BATCH:(b + 1) * EVAL_BATCH]
                real = bool(ids)
                ids = ids or self.mine[-EVAL_BATCH:] or [0]  # a filler pass keeps ranks in step
                batch = encode_batch([self.examples[i] for i in ids], self.tokenizer, self.task.max_seq_len,
                                     self.task.type, with_labels=False)
                logits = self.model(**{k: v.to(self.dev) for k, v in batch.items()}).logits.float().cpu()
                if real:
                    out += [(i, row.tolist()) for i, row in zip(ids, logits)]
        self.model.train(was_training)
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
        """Write the live model to the best folder (rank 0; collective under ZeRO-3: parameters gathered)."""
        state = full_state_dict(self.model, self.zero, self.rank)
        if self.rank != 0:
            return
        model = type(self.model)(self.model.config)
        model.load_state_dict(state, strict=True)
        remove_stale_temps(self.folder)  # what an interrupted export (a crash, a full disk) left beside it
        tmp = temp_dir_beside(self.folder)
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            atomic_write_text(tmp / BEST_FILE, json.dumps({"step": step, "score": score, "metric":
                                                           self.task.main_metric, "split": self.split}))
            replace_dir(tmp, self.folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def best_checkpoint_hook(r, spec, parts, out_dir: Path, ranks: Ranks) -> Selector | None:
    """The after-step hook of a stage: best-checkpoint selection in a stage that selects on the task's
    metric (StageSpec.selects_on) when train.eval_every is set, else None."""
    if spec.selects_on is None or r.train.eval_every is None:
        return None
    plan = EvalPlan(load_task(r.task), r.train.eval_every, r.train.max_steps)
    return Selector(parts.student, parts.tokenizer, out_dir / BEST_DIR, plan, ranks)


def choose(ship: str | None, eval_every: int | None) -> str:
    """An explicit ship setting, else best when the run evaluates, else last."""
    return ship or ("best" if eval_every else "last")


def pick(choice: str, best: Path, last: Path) -> Path:
    """The best folder when chosen and written, else the last."""
    return best if choice == "best" and (best / "config.json").is_file() else last


def ship_choice(recipe) -> str:
    """task.ship, else best when the task-specific stage evaluates (train.eval_every), else last."""
    return choose(recipe.task.ship, recipe.for_stage(shipping_stage().name).train.eval_every)


def shipped_student(recipe, out: Path) -> Path:
    """The task-specific student the pipeline ships: student_best/ when chosen and written, else student/."""
    stage = Path(out) / shipping_stage().name
    return pick(ship_choice(recipe), stage / BEST_DIR, stage / "student")

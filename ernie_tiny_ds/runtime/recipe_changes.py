"""What a stage was trained with, and what a re-run may change.

Each checkpoint (recipe.json) and each stage_done.json keep the stage's effective recipe
(`Recipe.for_stage(stage)`, as a sorted JSON dict: the fingerprint). A resume or a pipeline skip
compares it with the recipe of this run and names every key that changed:

- safe on resume (applied with a warning): how long and how often the run works and logs,
  train.max_steps (the warm-up/decay schedule is rebuilt for the new length), and optim.lr (the
  scheduler's base rate is reset, so the new rate holds from the resumed step on);
- safe on a finished stage's skip: the same, except train.max_steps and optim.lr, which would
  have changed what the finished stage trained;
- everything else (model shapes, losses, data, batch sizes, precision, DeepSpeed config, …) is
  refused with the list of keys: `rm -r OUT/<stage>` retrains the stage, or use a new output_dir.

Teacher finetuning keeps a fingerprint of what it reads (finetune_fingerprint): finetune.lr,
finetune.epochs and the selection keys (eval_every, ship) are safe on its resume, the distillation
stages' settings are no part of it.

Not part of the fingerprint: output_dir (a run folder may move), the stages overrides
(already merged into the sections), the finetune section (it shapes the teacher,
whose path is compared), the augment section (its output, task.augmented_train_file, is), the
finetuned teacher of a stage that does not use it, and the task of a general-corpus stage.
"""
from __future__ import annotations

import json

from ..config import Recipe, to_dict
from ..config.dotted import flatten
from ..config.rules import SafeOn, rules_of, settings
from ..distill.loss_terms import LOSS_TERMS, stage_terms, term_weights
from ..errors import ConfigError
from ..stages import STAGE_SPECS


def safe_keys(occasion: SafeOn) -> frozenset[str]:
    """The dotted keys whose fields are marked safe to change on `occasion` (config/rules.py)."""
    return frozenset(key for key, f in settings(Recipe) if rules_of(f).safe_on & occasion)


SAFE_ON_SKIP = safe_keys(SafeOn.SKIP)
SAFE_ON_RESUME = safe_keys(SafeOn.RESUME)
# teacher finetuning: its own section sets the rate, length and batch (its fingerprint leaves out
# the distillation stages' settings)
FINETUNE_SAFE_ON_RESUME = safe_keys(SafeOn.FINETUNE_RESUME)
HOW_APPLIED = {key: rules_of(f).applied for key, f in settings(Recipe) if rules_of(f).applied}


def fingerprint(recipe: Recipe, stage: str) -> dict:
    """The effective recipe of `stage` (recipe.for_stage(stage) already applied or not), as plain JSON."""
    r = recipe.for_stage(stage)
    spec = STAGE_SPECS[stage]
    values = to_dict(r)
    # the stage's terms, defaults included; a term off by default and left off is no part of it, so a
    # release that registers such a term leaves the fingerprints of earlier runs as they were
    weights = term_weights(stage_terms(spec), r.losses.weights)
    values["losses"]["weights"] = {name: w for name, w in weights.items() if w or LOSS_TERMS[name].default_weight}
    # augment: only its output counts; students: each student's stage records its own `student:`
    for key in ("output_dir", "stages", "finetune", "augment", "students"):
        values.pop(key, None)
    _drop_unset_augmented_file(values)
    if not spec.finetuned_teacher:
        values["teacher"].pop("finetuned_path", None)
    if spec.data == "general":
        values.pop("task", None)
    return json.loads(json.dumps(values, sort_keys=True, default=str))


def _drop_unset_augmented_file(values: dict) -> None:
    """An unset task.augmented_train_file is left out, so runs recorded before the key existed still match."""
    task = values.get("task")
    if isinstance(task, dict) and task.get("augmented_train_file") is None:
        task.pop("augmented_train_file", None)


def finetune_fingerprint(recipe: Recipe) -> dict:
    """What teacher finetuning learns from: the pretrained teacher, the task, the finetune section and
    the run settings it reads (not the distillation stages' batch, steps, losses or data)."""
    values = to_dict(recipe)
    values["teacher"].pop("finetuned_path", None)
    values["task"].pop("augmented_train_file", None)  # finetuning never reads it
    train = {k: v for k, v in values["train"].items() if k not in ("max_steps", "micro_batch_size", "grad_accum")}
    optim = {k: v for k, v in values["optim"].items() if k not in ("lr", "weight_decay", "warmup_ratio")}
    kept = {"teacher": values["teacher"], "task": values["task"], "finetune": values["finetune"], "train": train,
            "optim": optim, "deepspeed": values["deepspeed"], "data": {"tokenizer": values["data"]["tokenizer"]}}
    return json.loads(json.dumps(kept, sort_keys=True, default=str))


def changed_keys(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(key, old value, new value) for every dotted key that differs, sorted."""
    a, b = flatten(old), flatten(new)
    missing = object()
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb:
            out.append((key, None if va is missing else va, None if vb is missing else vb))
    return out


def check(old: dict, new: dict, safe: frozenset, what: str, remedy: str) -> list[tuple[str, object, object]]:
    """The changes in `safe`; ConfigError naming every other changed key (one line)."""
    changes = changed_keys(old, new)
    refused = [(k, a, b) for k, a, b in changes if k not in safe]
    if refused:
        listed = ", ".join(f"{k} ({a!r} -> {b!r})" for k, a, b in refused)
        allowed = ", ".join(sorted(safe))
        raise ConfigError(f"{what}: {listed}; only {allowed} may change here; {remedy}")
    return changes

"""Finetune the pretrained teacher on the task: the teacher that stages 2-4 distil from.

The pretrained encoder (teacher.path, or the inline teacher.config of tests, built exactly as
stage 1 builds it) gets a fresh sequence-classification head (num_labels, id2label, problem_type)
and is trained on the task's train split under DeepSpeed data parallelism on every rank of the
process group (ZeRO stage from deepspeed.config), with the recipe's finetune settings. Rank 0
writes a Hugging Face folder (config, model.safetensors, tokenizer) loadable with
AutoModelForSequenceClassification, scores it on the dev split and renames it into place with a
done marker inside: a finished output is reused by a re-run. Checkpoints (every train.save_every
steps, and on a stop request: STOP file or SIGUSR1) go to OUTPUT.checkpoints; the same command run
again resumes from the newest intact one, and they are removed once the output is in place.
With finetune.eval_every (default train.eval_every) the teacher is scored every N steps and at the
last (runtime/selection.py: on task.selection_split, else dev) and the best is exported to
OUTPUT_best/ (best.json: step, score, metric, split) beside the last; finetune.ship (default best
when evaluating) picks the one stages 2-4 distil from (shipped_teacher).
    deepspeed --num_gpus 2 --module ernie_tiny_ds.cli finetune-teacher --config R [--output DIR]
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import torch

from ..config import Recipe, load_recipe
from ..data.tasks import TaskData, build_task_loader, load_task
from ..errors import ConfigError, UserError
from ..files import atomic_write_text, remove_stale_temps, replace_dir, temp_dir_beside
from ..outputs import claim_output, exclusive, output_dir_job, recipe_inputs, write_marker

DONE_FILE = "finetune_done.json"
DEFAULT_DIR = "teacher_finetuned"
FINETUNED = "teacher_finetuned"  # the marker kind of a finetuned teacher folder
FINETUNED_KEY = "teacher.finetuned_path"  # where stages 2-4 read what this writes: no input of finetuning
BEST_SUFFIX = "_best"


def best_dir(output: Path) -> Path:
    """Where the best teacher goes: beside the last, as the checkpoints are (OUTPUT_best/)."""
    return output.with_name(output.name + BEST_SUFFIX)


def last_and_best(teacher: Path) -> tuple[Path, Path]:
    """(last, best) folders of a finetuned teacher given either of them."""
    from ..runtime.selection import read_best

    if teacher.name.endswith(BEST_SUFFIX) and read_best(teacher) is not None:
        return teacher.with_name(teacher.name[:-len(BEST_SUFFIX)]), teacher
    return teacher, best_dir(teacher)


def eval_every(recipe: Recipe) -> int | None:
    """finetune.eval_every, else train.eval_every (the recipe's own, not a stage's override)."""
    return recipe.finetune.eval_every if recipe.finetune.eval_every is not None else recipe.train.eval_every


def ship_choice(recipe: Recipe) -> str:
    """finetune.ship, else best when finetuning evaluates, else last."""
    from ..runtime.selection import choose
    return choose(recipe.finetune.ship, eval_every(recipe))


def shipped_teacher(recipe: Recipe, output: Path) -> Path:
    """The finetuned teacher stages 2-4 distil from: the best when chosen and written, else the last."""
    from ..runtime.selection import pick
    return pick(ship_choice(recipe), best_dir(output), output)


def build_classifier(recipe: Recipe, task: TaskData):
    """The pretrained teacher encoder under a fresh task head (same weights on every rank)."""
    import transformers

    from ..distill.models import base_model, load_teacher

    if recipe.teacher.path is None and recipe.teacher.config is None:
        raise ConfigError("teacher.path: finetuning needs the pretrained teacher (teacher.path or teacher.config)")
    encoder = load_teacher(dataclasses.replace(recipe.teacher, finetuned_path=None), finetuned=False,
                           seed=recipe.train.seed)
    config = copy.deepcopy(encoder.config)
    config.architectures = None
    config.num_labels = task.num_labels
    names = task.label_names or ["LABEL_0"]
    config.id2label = dict(enumerate(names))
    config.label2id = {name: i for i, name in enumerate(names)}
    config.problem_type = "regression" if task.type == "regression" else "single_label_classification"
    torch.manual_seed(recipe.finetune.seed)
    # fp32 master weights whatever dtype the checkpoint was saved in; DeepSpeed casts for bf16/fp16 training
    model = transformers.AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa",
                                                                        dtype=torch.float32)
    base_model(model).load_state_dict(encoder.state_dict(), strict=True)
    return model


def finetune_recipe(recipe: Recipe, total_steps: int) -> Recipe:
    """The recipe with the finetune section in the places the engine builder reads (batch, lr, warm-up, steps)."""
    ft = recipe.finetune
    if not 0 <= ft.warmup_ratio < 1:
        raise ConfigError(f"finetune.warmup_ratio must be in [0, 1), got {ft.warmup_ratio}")
    if ft.weight_decay < 0:
        raise ConfigError(f"finetune.weight_decay must be >= 0, got {ft.weight_decay}")
    if ft.eval_every is not None and ft.eval_every <= 0:
        raise ConfigError(f"finetune.eval_every must be > 0, got {ft.eval_every}")
    return dataclasses.replace(
        recipe,
        train=dataclasses.replace(recipe.train, micro_batch_size=ft.micro_batch_size, grad_accum=1,
                                  max_steps=total_steps, eval_every=eval_every(recipe)),
        optim=dataclasses.replace(recipe.optim, lr=ft.lr, weight_decay=ft.weight_decay,
                                  warmup_ratio=ft.warmup_ratio))


def _reusable(output: Path, task: TaskData) -> bool:
    marker = output / DONE_FILE
    if not marker.is_file():
        return False
    done = json.loads(marker.read_text())
    if done.get("type") != task.type or done.get("labels") != task.label_names:
        raise ConfigError(f"{output} holds a teacher finetuned for another task ({done.get('type')}, labels "
                          f"{done.get('labels')}); remove it or pick another --output")
    return True


def save_finetuned(model_config, state: dict, tokenizer, task: TaskData, output: Path, summary: dict) -> dict:
    """Rank 0: write, score and rename the Hugging Face folder; returns the dev metrics ({} without dev)."""
    import transformers

    from ..files import weights_disk_full_is_one_line
    from .evaluate import evaluate_on_task

    model = transformers.AutoModelForSequenceClassification.from_config(model_config, dtype=torch.float32)
    model.load_state_dict(state, strict=True)
    remove_stale_temps(output)  # what an interrupted write (a full disk) left beside it
    tmp = temp_dir_beside(output)
    try:
        with weights_disk_full_is_one_line(output, model):
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        saved = transformers.AutoModelForSequenceClassification.from_pretrained(tmp)  # score what was written
        metrics = evaluate_on_task(saved, tokenizer, task) if task.dev else {}
        atomic_write_text(tmp / DONE_FILE, json.dumps({**summary, "dev_metrics": metrics}, indent=1))
        write_marker(tmp, FINETUNED)
        replace_dir(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return metrics


def finetune_teacher(recipe: Recipe, output_dir: str | os.PathLike | None = None,
                     overwrite: bool = False) -> Path | None:
    """Collective: every rank calls it; returns the finetuned teacher folder, or None when a stop
    request ended the run at a checkpoint (the same call resumes it)."""
    # imported here, not at the top: the training stack (transformers, deepspeed) is heavy, and the
    # CLI's parsing imports this module
    from ..data.tokenizer import check_vocab_matches, load_tokenizer, recipe_tokenizer_path
    from ..distill.objective import ClassifierObjective
    from ..runtime import checkpoint, rank_registry, recipe_changes
    from ..runtime.checkpointer import Checkpointer
    from ..runtime.ds_config import build_ds_config, zero_stage
    from ..runtime.engines import build_training_engine
    from ..runtime.flops import peak_flops
    from ..runtime.metrics import MetricsLogger
    from ..runtime.process_group import device, init_distributed
    from ..runtime.shared_folder import require_shared_folder
    from ..runtime.stop import StopRequest

    output = Path(output_dir) if output_dir is not None else Path(recipe.output_dir) / DEFAULT_DIR
    task = load_task(recipe.task)
    if not overwrite and _reusable(output, task):  # a file check every rank makes alike: no process group needed
        if os.environ.get("RANK", "0") == "0":
            print(f"finetuned teacher already in {output} ({DONE_FILE}); reusing it", flush=True)
        return output
    # before any training: the output replaces this folder at the end
    claim_output(output, FINETUNED, "--output" if output_dir is not None else "output_dir",
                 recipe_inputs(recipe, leave_out=(FINETUNED_KEY,)), overwrite)
    rank, world = init_distributed(recipe.train.dist_timeout_s, recipe.train.dist_backend)
    ckpt_root = output.with_name(output.name + ".checkpoints")
    # before any work: the checkpoints and the output, beside each other, need one folder for all ranks
    require_shared_folder(output.parent, rank, world, "--output" if output_dir is not None else "output_dir")
    rank_registry.register(ckpt_root / ".ranks", rank, world)  # lets a survivor name a rank that dies

    ft = recipe.finetune
    # finetuning starts from the pretrained teacher
    tokenizer_dir = recipe_tokenizer_path(recipe, use_finetuned_teacher=False)
    tokenizer = load_tokenizer(tokenizer_dir)
    model = build_classifier(recipe, task)
    check_vocab_matches(tokenizer, model.config, tokenizer_dir)
    loader = build_task_loader(recipe.task, tokenizer, ft.micro_batch_size, rank, world, ft.seed, with_labels=True)
    total = max(1, math.ceil(ft.epochs * loader.batches_per_epoch))
    r = finetune_recipe(recipe, total)
    ds_config = build_ds_config(r, world)
    objective = ClassifierObjective(model)  # the engine trains the classifier through train_step
    engine = build_training_engine(objective, r, ds_config)
    if rank == 0:
        print(f"finetuning the teacher on {task.name} ({task.type}, {task.num_labels} output(s)): "
              f"{len(task.train)} examples, {total} steps of {ft.micro_batch_size} x {world} rank(s), "
              f"ZeRO-{zero_stage(ds_config)}", flush=True)

    # a changed finetune.lr or epochs applies on resume (with a warning); other changes are refused
    start = checkpoint.resume_or_seed(engine, ckpt_root, loader, rank, ft.seed, what="finetuning",
                                      recipe=recipe_changes.finetune_fingerprint(recipe),
                                      safe=recipe_changes.FINETUNE_SAFE_ON_RESUME, lr_key="finetune.lr",
                                      schedule_keys=("finetune.lr", "finetune.epochs"))

    dev = device()
    # the training log (rates and MFU, as in the stages) beside the checkpoints, a line every tenth of the run
    peak = peak_flops(dev, r.train.precision, r.train.peak_tflops) if rank == 0 else None
    logger = MetricsLogger(ckpt_root, rank, total, start, "finetune", progress_bar=False,
                           log_every=max(1, total // 10), peak_flops=peak)
    # no save at the last step: the finished output replaces the checkpoints
    checkpointer = Checkpointer(engine, ckpt_root, loader, every=recipe.train.save_every, last_step=total,
                                keep=recipe.train.keep_checkpoints, stop_request=StopRequest(recipe.output_dir),
                                save_last=False)
    selector = _selector(r, task, objective.classifier, tokenizer, output, rank, world, zero_stage(ds_config),
                         resumed=start > 0)
    loss = _train_steps(engine, objective, iter(loader), logger, checkpointer, start, total, world, rank, selector)
    logger.close()
    if loss is None:  # a stop request: checkpointed, the same call resumes
        engine.destroy()
        return None
    _write_output(recipe, task, objective, model, tokenizer, output, ckpt_root, selector, zero_stage(ds_config),
                  rank, {"task": task.name, "type": task.type, "labels": task.label_names, "steps": total,
                         "epochs": ft.epochs, "final_loss": loss, "world_size": world})
    engine.destroy()
    return output


def _write_output(recipe: Recipe, task: TaskData, objective, model, tokenizer, output: Path, ckpt_root: Path,
                  selector, zero: int, rank: int, summary: dict) -> None:
    """Collective: gathers the classifier, rank 0 writes and scores the finetuned teacher, then drops the
    checkpoints it no longer needs."""
    from ..runtime.collectives import wait_for_rank0  # heavy stack: see finetune_teacher
    from ..runtime.selection import full_state_dict, read_best

    state = full_state_dict(objective.classifier, zero, rank)  # the classifier's own keys
    if rank == 0:
        if selector is not None:  # the best's step and score, and the choice stages 2-4 follow
            summary.update(best=read_best(selector.folder), ship=ship_choice(recipe))
        metrics = save_finetuned(model.config, state, tokenizer, task, output, summary)
        print(f"finetuned teacher written to {output}; dev metrics {json.dumps(metrics)}"
              f"{'' if selector is None else f'; best in {selector.folder}, {ship_choice(recipe)} is used'}",
              flush=True)
    # the dev evaluation can outlast train.dist_timeout_s: the other ranks wait for it without that timeout
    wait_for_rank0()
    if rank == 0:  # after the wait: the rank registry in there lets the others name a rank 0 that dies
        shutil.rmtree(ckpt_root, ignore_errors=True)  # the output is final: its checkpoints are not needed


def _selector(r: Recipe, task: TaskData, classifier, tokenizer, output: Path, rank: int, world: int, zero: int,
              resumed: bool):
    """The best-teacher selector when finetuning evaluates, else None; a fresh run forgets an earlier best."""
    from ..runtime.process_group import device
    from ..runtime.selection import Selector, read_best

    if r.train.eval_every is None:
        return None
    folder = best_dir(output)
    key = "finetune.eval_every" if r.finetune.eval_every is not None else "train.eval_every"
    if folder.exists() and read_best(folder) is None:  # every rank sees the same files: all stop alike
        raise ConfigError(f"{key}: {folder} exists and is not a best teacher (no best.json); the best teacher "
                          "is exported there: remove it or pick another --output")
    return Selector(task, classifier, tokenizer, folder, r.train.eval_every, r.train.max_steps, rank, world,
                    device(), zero, key=key, resumed=resumed)


def _train_steps(engine, objective, batches, logger, checkpointer, start: int, total: int, world: int,
                 rank: int, selector=None) -> float | None:
    """Steps start+1..total of teacher finetuning; the last global loss, or None when a stop request
    ended the run at a checkpoint."""
    from ..runtime.flops import finetune_step_flops
    from ..runtime.loop import batch_to_device, global_mean
    from ..runtime.process_group import device
    from ..runtime.step import StepParts, train_step

    dev, parts, loss = device(), StepParts(engine), float("nan")
    engine.train()
    for step in range(start + 1, total + 1):
        batch = batch_to_device(next(batches), dev)
        result = train_step(parts, batch)  # grad_accum is 1: every step is an optimizer step
        if not result.finite:
            raise UserError(f"finetune: non-finite loss at step {step}; lower finetune.lr or check the task data")
        loss = global_mean({"loss": result.total}, world)["loss"]  # read on the host: the step's time is complete
        logger.step(step, {"loss": loss, "lr": result.lr}, tokens=result.tokens * world,
                    flops=finetune_step_flops(objective.classifier, *batch["input_ids"].shape))
        if selector is not None:
            selector(step)  # finetune.eval_every: score, export the best (runtime/selection.py)
        if checkpointer.after_step(step):
            if rank == 0:
                checkpointer.stop_request.clear()
                print(f"finetune: stopped at step {step} of {total} (stop requested: STOP file or SIGUSR1); "
                      f"checkpoint saved; run the same command again to continue", flush=True)
            return None
    return loss


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML recipe (teacher, task and finetune sections)")
    parser.add_argument("--output", help=f"output folder (default: OUTPUT_DIR/{DEFAULT_DIR})")
    parser.add_argument("--overwrite", action="store_true",
                        help="retrain and replace an earlier finetuned teacher in --output instead of reusing "
                             "it (nothing else is ever replaced)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")


def run(args) -> int:
    recipe = load_recipe(args.config, args.overrides)
    if args.output is None:  # OUTPUT_DIR/teacher_finetuned: a job in the output_dir, as the pipeline's
        job = output_dir_job(recipe)
    else:  # its own folder: the lock covers OUTPUT, OUTPUT.checkpoints and OUTPUT_best
        # checked before the lock file is made beside it (finetune_teacher checks again, --overwrite included)
        output = claim_output(args.output, FINETUNED, "--output", recipe_inputs(recipe, leave_out=(FINETUNED_KEY,)))
        job = exclusive(output.parent, output.name, "--output")
    with job:
        finetune_teacher(recipe, args.output, overwrite=args.overwrite)
    return 0

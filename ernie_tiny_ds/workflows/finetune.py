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
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from ..config import Recipe, load_recipe
from ..data.tasks import TaskData, build_task_loader, load_task
from ..data.tokenizer import check_vocab_matches, load_tokenizer, recipe_tokenizer_path
from ..data.workers import Loading
from ..distill.models import base_model, load_teacher
from ..distill.objective import ClassifierObjective
from ..errors import ConfigError
from ..files import (
    atomic_write_text,
    remove_stale_temps,
    replace_dir,
    temp_dir_beside,
    weights_disk_full_is_one_line,
)
from ..outputs import claim_output, exclusive, output_dir_job, recipe_inputs, write_marker
from ..runtime import checkpoint, rank_registry, recipe_changes
from ..runtime.checkpointer import Checkpointer, SaveSchedule
from ..runtime.collectives import wait_for_rank0
from ..runtime.device_defaults import prepare_for_device
from ..runtime.ds_config import build_ds_config, zero_stage
from ..runtime.engine_settings import EngineSettings
from ..runtime.engines import build_training_engine
from ..runtime.flops import finetune_step_flops, peak_flops
from ..runtime.metrics import MetricsLogger
from ..runtime.process_group import device, init_distributed
from ..runtime.selection import EvalPlan, Ranks, Selector, choose, full_state_dict, pick, read_best
from ..runtime.shared_folder import require_shared_folder
from ..runtime.step import StepParts, train_step
from ..runtime.stop import StopRequest
from ..runtime.trainer import FailOnNonFinite, Trainer, on_device
from .evaluate import evaluate_on_task

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
    if teacher.name.endswith(BEST_SUFFIX) and read_best(teacher) is not None:
        return teacher.with_name(teacher.name[:-len(BEST_SUFFIX)]), teacher
    return teacher, best_dir(teacher)


def eval_every(recipe: Recipe) -> int | None:
    """finetune.eval_every, else train.eval_every (the recipe's own, not a stage's override)."""
    return recipe.finetune.eval_every if recipe.finetune.eval_every is not None else recipe.train.eval_every


def ship_choice(recipe: Recipe) -> str:
    """finetune.ship, else best when finetuning evaluates, else last."""
    return choose(recipe.finetune.ship, eval_every(recipe))


def shipped_teacher(recipe: Recipe, output: Path) -> Path:
    """The finetuned teacher stages 2-4 distil from: the best when chosen and written, else the last."""
    return pick(ship_choice(recipe), best_dir(output), output)


def build_classifier(recipe: Recipe, task: TaskData):
    """The pretrained teacher encoder under a fresh task head (same weights on every rank)."""
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


def engine_settings(recipe: Recipe, total_steps: int):
    """What the engine trains the classifier with: the finetune section's batch, rate, warm-up and
    decay over `total_steps`; precision, betas, eps and clipping as the recipe's."""
    ft, o = recipe.finetune, recipe.optim
    if not 0 <= ft.warmup_ratio < 1:
        raise ConfigError(f"finetune.warmup_ratio must be in [0, 1), got {ft.warmup_ratio}")
    if ft.weight_decay < 0:
        raise ConfigError(f"finetune.weight_decay must be >= 0, got {ft.weight_decay}")
    if ft.eval_every is not None and ft.eval_every <= 0:
        raise ConfigError(f"finetune.eval_every must be > 0, got {ft.eval_every}")
    return EngineSettings(micro_batch_size=ft.micro_batch_size, grad_accum=1, precision=recipe.train.precision,
                          lr=ft.lr, weight_decay=ft.weight_decay, warmup_ratio=ft.warmup_ratio,
                          total_steps=total_steps, betas=tuple(o.betas), eps=o.eps, grad_clip=o.grad_clip)


@dataclass
class FinetuneJob:
    """One rank's teacher finetuning: the classifier it trains on the task, where the output and the
    checkpoints beside it go, the run's length and where this rank runs."""
    task: TaskData
    classifier: torch.nn.Module
    tokenizer: object
    output: Path
    ckpt_root: Path
    steps: int
    ranks: Ranks


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
    recipe = prepare_for_device(recipe, device())  # the `auto` keys for this device, before anything reads them
    ckpt_root = output.with_name(output.name + ".checkpoints")
    # before any work: the checkpoints and the output, beside each other, need one folder for all ranks
    require_shared_folder(output.parent, rank, world, "--output" if output_dir is not None else "output_dir")
    rank_registry.register(ckpt_root / ".ranks", rank, world)  # lets a survivor name a rank that dies

    job, run = _build(recipe, task, output, ckpt_root, rank, world)
    start = checkpoint.resume_or_seed(run, rank, recipe.finetune.seed)
    selector = _selector(recipe, job, resumed=start > 0)
    fit = _train(recipe, job, run, selector, start)
    if fit.stopped:  # a stop request: checkpointed, the same call resumes
        run.engine.destroy()
        return None
    _write_output(recipe, job, selector, {"task": task.name, "type": task.type, "labels": task.label_names,
                                          "steps": job.steps, "epochs": recipe.finetune.epochs,
                                          "final_loss": fit.last["loss"], "world_size": world})
    run.engine.destroy()
    return output


def _build(recipe: Recipe, task: TaskData, output: Path, ckpt_root: Path, rank: int, world: int):
    """The classifier under its DeepSpeed engine, with its tokenizer and loader: (FinetuneJob, CheckpointedRun)."""
    ft = recipe.finetune
    # finetuning starts from the pretrained teacher
    tokenizer_dir = recipe_tokenizer_path(recipe, use_finetuned_teacher=False)
    tokenizer = load_tokenizer(tokenizer_dir)
    model = build_classifier(recipe, task)
    check_vocab_matches(tokenizer, model.config, tokenizer_dir)
    loader = build_task_loader(recipe.task, tokenizer, ft.micro_batch_size, rank, world, ft.seed, with_labels=True,
                               loading=Loading.for_device(recipe.data.num_workers, device()))
    total = max(1, math.ceil(ft.epochs * loader.batches_per_epoch))
    settings = engine_settings(recipe, total)
    ds_config = build_ds_config(recipe.deepspeed, settings, world)
    objective = ClassifierObjective(model)  # the engine trains the classifier through train_step
    engine = build_training_engine(objective, settings, ds_config)
    ranks = Ranks(rank, world, device(), zero_stage(ds_config))
    if rank == 0:
        print(f"finetuning the teacher on {task.name} ({task.type}, {task.num_labels} output(s)): "
              f"{len(task.train)} examples, {total} steps of {ft.micro_batch_size} x {world} rank(s), "
              f"ZeRO-{ranks.zero}", flush=True)
    # a changed finetune.lr or epochs applies on resume (with a warning); other changes are refused
    record = checkpoint.RecipeRecord(recipe_changes.finetune_fingerprint(recipe),
                                     safe=recipe_changes.FINETUNE_SAFE_ON_RESUME, lr_key="finetune.lr",
                                     schedule_keys=("finetune.lr", "finetune.epochs"))
    return (FinetuneJob(task, model, tokenizer, output, ckpt_root, total, ranks),
            checkpoint.CheckpointedRun(engine, loader, ckpt_root, "finetuning", record))


def _train(recipe: Recipe, job: FinetuneJob, run, selector, start: int):
    """Steps start+1..job.steps through the training loop; a non-finite loss ends the run."""
    rank, total = job.ranks.rank, job.steps
    # the training log (rates and MFU, as in the stages) beside the checkpoints, a line every tenth of the run
    peak = peak_flops(job.ranks.device, recipe.train.precision, recipe.train.peak_tflops) if rank == 0 else None
    logger = MetricsLogger(job.ckpt_root, rank, total, start, "finetune", progress_bar=False,
                           log_every=max(1, total // 10), peak_flops=peak)
    # no save at the last step: the finished output replaces the checkpoints
    schedule = SaveSchedule(recipe.train.save_every, total, recipe.train.keep_checkpoints, save_last=False)
    checkpointer = Checkpointer(run, schedule, StopRequest(recipe.output_dir))
    parts = StepParts(run.engine)  # grad_accum is 1: every step is an optimizer step
    trainer = Trainer(lambda batch, window: train_step(parts, batch, window=window), checkpointer, logger,
                      FailOnNonFinite("finetune", "lower finetune.lr or check the task data"),
                      flops=lambda rows, length: finetune_step_flops(job.classifier, rows, length),
                      hooks=[selector] if selector is not None else [])  # finetune.eval_every: score, keep the best
    run.engine.train()
    fit = trainer.fit(on_device(run.loader, job.ranks.device), start, total)
    if fit.stopped and rank == 0:
        checkpointer.stop_request.clear()
        print(f"finetune: stopped at step {fit.step} of {total} (stop requested: STOP file or SIGUSR1); "
              f"checkpoint saved; run the same command again to continue", flush=True)
    return fit


def _write_output(recipe: Recipe, job: FinetuneJob, selector, summary: dict) -> None:
    """Collective: gathers the classifier, rank 0 writes and scores the finetuned teacher, then drops the
    checkpoints it no longer needs."""
    rank = job.ranks.rank
    state = full_state_dict(job.classifier, job.ranks.zero, rank)  # the classifier's own keys
    if rank == 0:
        if selector is not None:  # the best's step and score, and the choice stages 2-4 follow
            summary.update(best=read_best(selector.folder), ship=ship_choice(recipe))
        metrics = save_finetuned(job.classifier.config, state, job.tokenizer, job.task, job.output, summary)
        print(f"finetuned teacher written to {job.output}; dev metrics {json.dumps(metrics)}"
              f"{'' if selector is None else f'; best in {selector.folder}, {ship_choice(recipe)} is used'}",
              flush=True)
    # the dev evaluation can outlast train.dist_timeout_s: the other ranks wait for it without that timeout
    wait_for_rank0()
    if rank == 0:  # after the wait: the rank registry in there lets the others name a rank 0 that dies
        shutil.rmtree(job.ckpt_root, ignore_errors=True)  # the output is final: its checkpoints are not needed


def _selector(recipe: Recipe, job: FinetuneJob, resumed: bool):
    """The best-teacher selector when finetuning evaluates, else None; a fresh run forgets an earlier best."""
    every = eval_every(recipe)
    if every is None:
        return None
    folder = best_dir(job.output)
    key = "finetune.eval_every" if recipe.finetune.eval_every is not None else "train.eval_every"
    if folder.exists() and read_best(folder) is None:  # every rank sees the same files: all stop alike
        raise ConfigError(f"{key}: {folder} exists and is not a best teacher (no best.json); the best teacher "
                          "is exported there: remove it or pick another --output")
    return Selector(job.classifier, job.tokenizer, folder, EvalPlan(job.task, every, job.steps, key), job.ranks,
                    resumed=resumed)


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

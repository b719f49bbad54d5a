"""`ernie-tiny-ds pipeline`: teacher finetuning, then stages 1-4, each starting from the student the
previous stage wrote, then the report.

    OUT/teacher_finetuned/   stage 0 (only when the recipe gives no finetuned teacher); with
                             finetune.eval_every its best beside it in OUT/teacher_finetuned_best/
    OUT/<stage>/             checkpoints, metrics.jsonl, stage_done.json, student/ (the export)
    OUT/report.md|json|*.png after the task-specific stage

A re-run of the same command skips finished stages (their stage_done.json) and resumes the
interrupted one from its newest checkpoint. A STOP file in OUT or SIGUSR1 ends the run cleanly.
One job at a time per OUT (outputs.py: OUT/.lock, OUT/.ernie-tiny-ds.json).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from ..config import STAGES, Recipe, load_recipe
from ..distill.objective import PROJECTIONS_FILE
from ..errors import ConfigError, UserError
from ..runtime import recipe_changes, stop
from ..runtime.collectives import wait_for_rank0
from ..runtime.loop import DONE_FILE, run_stage
from ..stages import STAGE_SPECS

FINETUNE = "finetune"
PIPELINE_DONE = "pipeline_done.json"


def parse_stage(value: str) -> int:
    """A stage by name or number: 0 = teacher finetuning, 1-4 = the distillation stages."""
    names = [FINETUNE, *STAGES]
    if value.isdigit() and 0 <= int(value) < len(names):
        return int(value)
    if value in names:
        return names.index(value)
    raise argparse.ArgumentTypeError(f"unknown stage {value!r}: use 0-4 or one of {', '.join(names)}")


def stage_done(out: Path, stage: str) -> dict | None:
    path = out / stage / DONE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def check_finished_stage(recipe: Recipe, stage: str, done: dict, out: Path) -> None:
    """A finished stage is skipped only when its recipe is the one it finished with (up to keys that
    change how a run works, not what it learns); otherwise one line names every changed key."""
    saved = done.get("recipe")
    if saved is None:  # a marker written before recipes were kept
        return
    recipe_changes.check(saved, recipe_changes.fingerprint(recipe, stage), recipe_changes.SAFE_ON_SKIP,
                         f"pipeline: the recipe of {stage} changed since it finished",
                         f"rm -r {out / stage} (and the later stages' folders) to retrain it with this recipe, "
                         "or use a new output_dir")


def ensure_export(out: Path, stage: str, done: dict, rank: int) -> None:
    """Rank 0 test-loads a finished stage's export (the next stage starts from it); one that does not
    load (a truncated model.safetensors) is rebuilt from the stage's final checkpoint. Collective."""
    from ..runtime.checkpoint import tag_for
    from ..runtime.export import export_checkpoint, export_problem

    student = out / stage / "student"
    if rank == 0:
        problem = export_problem(student) if student.is_dir() else "the folder is missing"
        if problem is not None:
            final = out / stage / "checkpoints" / tag_for(int(done["steps"]))
            source = final if final.is_dir() else final.parent
            print(f"warning: pipeline: the export of {stage} in {student} does not load ({problem}); "
                  f"rebuilding it from {source}", flush=True)
            try:
                export_checkpoint(source, student)
            except UserError as exc:
                raise UserError(f"pipeline: the export of {stage} in {student} does not load ({problem}) and "
                                f"cannot be rebuilt ({exc}); rm -r {out / stage} to retrain the stage") from None
    wait_for_rank0()


def with_paths(recipe: Recipe, student_path: str | None, finetuned: str | None) -> Recipe:
    return dataclasses.replace(recipe, student=dataclasses.replace(recipe.student, path=student_path),
                               teacher=dataclasses.replace(recipe.teacher, finetuned_path=finetuned))


def initial_student(recipe: Recipe, out: Path, first: int) -> str | None:
    """Stage `first` starts from the previous stage's export when there is one, else the recipe's student."""
    if first > 1:
        previous = STAGES[first - 2]
        if (out / previous / "student" / "config.json").is_file():
            return str(out / previous / "student")
        if recipe.student.path is None:
            raise ConfigError(f"--from-stage {STAGES[first - 1]}: there is no {out / previous / 'student'}; "
                              "set student.path to the student this stage should start from")
    return recipe.student.path


def ensure_finetuned_teacher(recipe: Recipe, out: Path, stages: list[str], allowed: bool) -> tuple[str | None, bool]:
    """(finetuned teacher path or None when no stage needs one, True when a stop request ended finetuning)."""
    if recipe.teacher.finetuned_path or not any(STAGE_SPECS[s].finetuned_teacher for s in stages):
        return recipe.teacher.finetuned_path, False
    if not allowed:
        raise ConfigError("teacher.finetuned_path: these stages need a finetuned teacher; set it, or include "
                          "stage 0 (finetune) in the range")
    from .finetune import finetune_teacher, shipped_teacher
    path = finetune_teacher(recipe, out / "teacher_finetuned")
    if path is None:
        return None, True
    return str(shipped_teacher(recipe, path)), False  # finetune.ship: the best (by task.metric) or the last


def run_pipeline(recipe: Recipe, first: int = 0, last: int = 4) -> bool:
    """Runs stages first..last (0 = finetuning); True when the range finished, False when stopped."""
    from ..runtime.process_group import init_distributed

    if first > last:
        raise ConfigError(f"--from-stage ({first}) comes after --to-stage ({last})")
    stop.install()  # from here on a SIGUSR1 is kept until a stage, or the check between stages, consumes it
    rank, world = init_distributed(recipe.train.dist_timeout_s, recipe.train.dist_backend)
    out = Path(recipe.output_dir)
    stop_request = stop.StopRequest(out)
    stages = list(STAGES[max(first, 1) - 1:last])
    finetuned, stopped = ensure_finetuned_teacher(recipe, out, stages, allowed=first == 0)
    if stopped:
        if rank == 0:
            print("pipeline: stopped during finetune; run the same command to resume", flush=True)
        return False
    student = initial_student(recipe, out, max(first, 1))
    results, projections = [], None  # projections: the previous stage's, carried into the next
    for stage in stages:
        staged = with_paths(recipe, student, finetuned)
        if results:  # the previous stage's projections, or none (never the recipe's, meant for the first)
            staged.student.projections = projections
        done = stage_done(out, stage)
        if done is not None:
            check_finished_stage(staged, stage, done, out)
            ensure_export(out, stage, done, rank)
            if rank == 0:
                print(f"pipeline: {stage} already done ({done['steps']} steps, final loss "
                      f"{done['final_loss']:.6g}); skipping", flush=True)
        else:
            if stop_request.requested():  # e.g. SIGUSR1 while the previous stage exported
                if rank == 0:
                    stop_request.clear()
                    print(f"pipeline: stop requested before {stage}; run the same command to resume", flush=True)
                return False
            if rank == 0:
                print(f"pipeline: {STAGE_SPECS[stage].title} ({stage}) starting from "
                      f"{student or 'a fresh student'}", flush=True)
            result = run_stage(staged, stage)
            if not result.complete:
                if rank == 0:
                    print(f"pipeline: stopped during {stage}; run the same command to resume", flush=True)
                return False
        results.append(stage)
        student = str(out / stage / "student")
        carried = out / stage / PROJECTIONS_FILE  # absent when the stage was exported before they were kept
        projections = str(carried) if carried.is_file() else None
    if last == 4:  # best or last (task.ship): the report scores it as the student, pipeline_done names it
        from ..runtime.selection import shipped_student
        student = str(shipped_student(recipe, out))
    if last == 4 and rank == 0:
        from .report import build_report
        build_report(with_paths(recipe, student, finetuned), out)
    wait_for_rank0()  # the report can outlast train.dist_timeout_s: the other ranks wait without it
    if rank == 0:
        from ..files import atomic_write_text
        atomic_write_text(out / PIPELINE_DONE,
                          json.dumps({"range": [first, last], "stages": results, "student": student}))
        print(f"pipeline: done ({', '.join(results) or 'nothing to run'}); student in {student}", flush=True)
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML recipe (or a bundled one: demo, ernie_tiny_en)")
    parser.add_argument("--from-stage", type=parse_stage, default=0, metavar="STAGE",
                        help="first stage: 0/finetune, 1/general, 2/general_enhanced, 3/task_adaptive, 4/task_specific")
    parser.add_argument("--to-stage", type=parse_stage, default=4, metavar="STAGE", help="last stage (default 4)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")


def run(args) -> int:
    from ..outputs import output_dir_job

    recipe = load_recipe(args.config, args.overrides)
    with output_dir_job(recipe):  # before the process group: a refused output_dir costs nothing
        run_pipeline(recipe, args.from_stage, args.to_stage)
    return 0

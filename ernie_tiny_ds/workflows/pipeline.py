"""`ernie-tiny-ds pipeline`: its steps in order (pipeline_steps): teacher finetuning, then each
distillation stage of stages.STAGE_SPECS starting from the student the previous stage wrote, then the
report once the stage that ships its student has run. --skip-stage leaves a stage out (TinyBERT's
schedule is --skip-stage general_enhanced --skip-stage task_adaptive): the stage after it starts from
the one before it.

    OUT/teacher_finetuned/   stage 0 (only when the recipe gives no finetuned teacher); with
                             finetune.eval_every its best beside it in OUT/teacher_finetuned_best/
    OUT/<stage>/             checkpoints, metrics.jsonl, stage_done.json, student/ (the export)
    OUT/report.md|json|*.png after the task-specific stage

With `students:` in the recipe, workflows/students_pipeline.py runs it: the general stages once for
every student (one teacher pass per batch), each student's later stages and report in OUT/<name>/.

A re-run of the same command skips finished stages (their stage_done.json) and resumes the
interrupted one from its newest checkpoint. A STOP file in OUT or SIGUSR1 ends the run cleanly.
One job at a time per OUT (outputs.py: OUT/.lock, OUT/.ernie-tiny-ds.json).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..config import Recipe, load_recipe
from ..data.tasks import resolve_task
from ..distill.objective import PROJECTIONS_FILE
from ..errors import ConfigError, UserError
from ..files import atomic_write_text
from ..outputs import output_dir_job
from ..runtime import recipe_changes, stop
from ..runtime.checkpoint import tag_for
from ..runtime.collectives import wait_for_rank0
from ..runtime.device_defaults import prepare_for_device
from ..runtime.export import export_checkpoint, export_problem
from ..runtime.loop import DONE_FILE, run_stage
from ..runtime.process_group import device, init_distributed
from ..runtime.selection import shipped_student
from ..stages import STAGE_SPECS
from .finetune import finetune_teacher, shipped_teacher
from .report import build_report

FINETUNE = "finetune"
PIPELINE_DONE = "pipeline_done.json"


def parse_stage(value: str) -> int:
    """A step by name or number: 0 = teacher finetuning, then the distillation stages in order."""
    names = [name for name, _ in pipeline_steps()]
    if value.isdigit() and 0 <= int(value) < len(names):
        return int(value)
    if value in names:
        return names.index(value)
    raise argparse.ArgumentTypeError(f"unknown stage {value!r}: use 0-{len(names) - 1} or one of {', '.join(names)}")


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


def initial_student(recipe: Recipe, out: Path, first: str, skipped: tuple[str, ...] = ()) -> str | None:
    """Stage `first` starts from the export of the stage before it (the nearest one not skipped) when there
    is one, else the recipe's student."""
    earlier = [name for name in list(STAGE_SPECS)[:list(STAGE_SPECS).index(first)] if name not in skipped]
    if earlier:
        previous = earlier[-1]
        if (out / previous / "student" / "config.json").is_file():
            return str(out / previous / "student")
        if recipe.student.path is None:
            raise ConfigError(f"--from-stage {first}: there is no {out / previous / 'student'}; "
                              "set student.path to the student this stage should start from")
    return recipe.student.path


def ensure_finetuned_teacher(recipe: Recipe, out: Path, stages: list[str], allowed: bool) -> tuple[str | None, bool]:
    """(finetuned teacher path or None when no stage needs one, True when a stop request ended finetuning)."""
    if recipe.teacher.finetuned_path or not any(STAGE_SPECS[s].finetuned_teacher for s in stages):
        return recipe.teacher.finetuned_path, False
    if not allowed:
        raise ConfigError("teacher.finetuned_path: these stages need a finetuned teacher; set it, or include "
                          "stage 0 (finetune) in the range")
    path = finetune_teacher(recipe, out / "teacher_finetuned")
    if path is None:
        return None, True
    return str(shipped_teacher(recipe, path)), False  # finetune.ship: the best (by task.metric) or the last


@dataclass
class PipelineRun:
    """What the steps of one pipeline run hand on to each other."""
    recipe: Recipe
    out: Path
    rank: int
    stages: list[str]                 # the distillation stages in the range
    stop_request: stop.StopRequest
    skipped: tuple[str, ...] = ()     # stages left out (--skip-stage): the next stage starts from the one before
    finetuned: str | None = None      # the finetuned teacher the stages distil from
    student: str | None = None        # the student the next stage starts from
    projections: str | None = None    # the previous stage's projections, carried into the next
    done: list[str] = field(default_factory=list)

    def say(self, line: str) -> None:
        if self.rank == 0:
            print(f"pipeline: {line}", flush=True)

    def stopped_before(self, stage: str) -> bool:
        """True (and the request consumed) when a stop was asked for before `stage` starts, e.g. a SIGUSR1
        while the previous stage exported."""
        if not self.stop_request.requested():
            return False
        if self.rank == 0:
            self.stop_request.clear()
        self.say(f"stop requested before {stage}; run the same command to resume")
        return True


def finetune_step(run: PipelineRun, name: str) -> bool:
    """Teacher finetuning, when a stage in the range needs a finetuned teacher the recipe does not give."""
    run.finetuned, stopped = ensure_finetuned_teacher(run.recipe, run.out, run.stages, allowed=True)
    if stopped:
        run.say(f"stopped during {name}; run the same command to resume")
    return not stopped


def distill_step(run: PipelineRun, stage: str) -> bool:
    """One distillation stage: skipped when finished with this recipe, else run (or resumed); False when stopped."""
    if not run.done:
        run.student = initial_student(run.recipe, run.out, stage, run.skipped)
    staged = with_paths(run.recipe, run.student, run.finetuned)
    if run.done:  # the previous stage's projections, or none (never the recipe's, meant for the first)
        staged.student.projections = run.projections
    done = stage_done(run.out, stage)
    if done is not None:
        check_finished_stage(staged, stage, done, run.out)
        ensure_export(run.out, stage, done, run.rank)
        run.say(f"{stage} already done ({done['steps']} steps, final loss {done['final_loss']:.6g}); skipping")
    else:
        if run.stopped_before(stage):
            return False
        run.say(f"{STAGE_SPECS[stage].title} ({stage}) starting from {run.student or 'a fresh student'}")
        if not run_stage(staged, stage).complete:
            run.say(f"stopped during {stage}; run the same command to resume")
            return False
    run.done.append(stage)
    run.student = str(run.out / stage / "student")
    carried = run.out / stage / PROJECTIONS_FILE  # absent when the stage was exported before they were kept
    run.projections = str(carried) if carried.is_file() else None
    return True


def pipeline_steps() -> list[tuple[str, Callable[[PipelineRun, str], bool]]]:
    """The pipeline in order: teacher finetuning, then every distillation stage (STAGE_SPECS, read now)."""
    return [(FINETUNE, finetune_step), *((stage, distill_step) for stage in STAGE_SPECS)]


def steps_to_run(first: int, last: int, skip: list[int]) -> tuple[list, tuple[str, ...]]:
    """The steps first..last of pipeline_steps() less the skipped ones, and the skipped stages' names."""
    steps = pipeline_steps()
    if first > last:
        raise ConfigError(f"--from-stage ({first}) comes after --to-stage ({last})")
    names = [name for name, _ in steps]
    for index in skip:
        if names[index] == FINETUNE:
            raise ConfigError("--skip-stage finetune: teacher finetuning runs only when a stage needs it and the "
                              "recipe gives no teacher.finetuned_path; set that key to use a teacher you have")
        if not first <= index <= last:
            raise ConfigError(f"--skip-stage {names[index]}: not in the range --from-stage {names[first]} "
                              f"--to-stage {names[last]}")
    kept = [step for index, step in enumerate(steps) if first <= index <= last and index not in skip]
    if not any(name in STAGE_SPECS for name, _ in kept):
        raise ConfigError("--skip-stage: every distillation stage in the range is skipped; nothing to run")
    return kept, tuple(names[index] for index in sorted(set(skip)))


def check_task_up_front(recipe: Recipe, names: list[str]) -> None:
    """A range that will read the task (a task stage, or teacher finetuning that has to run) is refused now
    when its task section cannot name the data, not after the general stages' hours."""
    stages = [name for name in names if name in STAGE_SPECS]
    finetunes = FINETUNE in names and not recipe.teacher.finetuned_path and \
        any(STAGE_SPECS[s].finetuned_teacher for s in stages)
    if finetunes or any(STAGE_SPECS[s].data == "task" for s in stages):
        resolve_task(recipe.task)


def run_pipeline(recipe: Recipe, first: int = 0, last: int | None = None, skip: list[int] = ()) -> bool:
    """Runs the steps first..last of pipeline_steps() (0 = finetuning, default: to the last stage) less the
    stages in `skip` (each later stage starts from the student of the one before it that ran);
    True when the range finished, False when stopped."""
    last = len(pipeline_steps()) - 1 if last is None else last
    if recipe.students:  # the general stages once for all students, then each student's own (OUT/<name>/)
        from .students_pipeline import run_students_pipeline  # it builds on this module
        return run_students_pipeline(recipe, first, last, list(skip))
    steps, skipped = steps_to_run(first, last, list(skip))
    check_task_up_front(recipe, [name for name, _ in steps])
    stop.install()  # from here on a SIGUSR1 is kept until a stage, or the check between stages, consumes it
    rank, world = init_distributed(recipe.train.dist_timeout_s, recipe.train.dist_backend)
    recipe = prepare_for_device(recipe, device())  # the `auto` keys for this device: skips compare them resolved
    out = Path(recipe.output_dir)
    stages = [name for name, _ in steps if name in STAGE_SPECS]
    run = PipelineRun(recipe, out, rank, stages, stop.StopRequest(out), skipped, student=recipe.student.path)
    if FINETUNE not in (name for name, _ in steps):  # refused before any work when a stage needs one
        run.finetuned, _ = ensure_finetuned_teacher(recipe, out, stages, allowed=False)
    for name, step in steps:
        if not step(run, name):
            return False
    student = run.student
    shipping = [stage for stage in stages if STAGE_SPECS[stage].ships]
    if shipping:  # best or last (task.ship): the report scores it as the student, pipeline_done names it
        student = str(shipped_student(recipe, out))
        if rank == 0:
            build_report(with_paths(recipe, student, run.finetuned), out, skipped)
    wait_for_rank0()  # the report can outlast train.dist_timeout_s: the other ranks wait without it
    if rank == 0:
        atomic_write_text(out / PIPELINE_DONE,
                          json.dumps({"range": [first, last], "skipped": list(skipped), "stages": run.done,
                                      "student": student}))
        run.say(f"done ({', '.join(run.done) or 'nothing to run'}); student in {student}")
    return True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    steps = ", ".join(f"{i}/{name}" for i, (name, _) in enumerate(pipeline_steps()))
    parser.add_argument("--config", required=True, help="YAML recipe (or a bundled one: demo, ernie_tiny_en)")
    parser.add_argument("--from-stage", type=parse_stage, default=0, metavar="STAGE", help=f"first stage: {steps}")
    parser.add_argument("--to-stage", type=parse_stage, default=None, metavar="STAGE",
                        help="last stage (default: the last)")
    parser.add_argument("--skip-stage", type=parse_stage, action="append", default=[], metavar="STAGE",
                        help="leave this distillation stage out (repeatable); the next stage starts from the "
                             "student of the one before it, e.g. TinyBERT's schedule: --skip-stage 2 --skip-stage 3")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")


def run(args) -> int:
    recipe = load_recipe(args.config, args.overrides)
    with output_dir_job(recipe):  # before the process group: a refused output_dir costs nothing
        run_pipeline(recipe, args.from_stage, args.to_stage, args.skip_stage)
    return 0

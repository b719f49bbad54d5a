"""`ernie-tiny-ds pipeline` for a recipe with `students:`: the teacher finetuned once, the
general-corpus stages run once for all students (one teacher pass per batch, runtime/shared_teacher.py),
then the task stages and the report per student, and OUT/report.md with one row per student.

    OUT/teacher_finetuned/        stage 0, shared (as in a single-student run)
    OUT/<name>/                   laid out as a single-student output_dir:
      <name>/general/, <name>/general_enhanced/   trained together with the other students
      <name>/task_adaptive/, <name>/task_specific/, <name>/report.md   this student's own pipeline
    OUT/report.md|json            one row per student (its shape, score, retained share, speed-up)
    OUT/pipeline_done.json        written last: the range, and each student's final folder by name

A student's later stages are the single-student pipeline with output_dir OUT/<name>, so
`pipeline --config R --from-stage 3 students=[] output_dir=OUT/<name> teacher.finetuned_path=...
student.num_hidden_layers=... (its shape keys)` runs them alone as well. A re-run of the same
command skips what is done and resumes the rest.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from ..config import Recipe
from ..files import atomic_write_text
from ..runtime import stop
from ..runtime.collectives import wait_for_rank0
from ..runtime.device_defaults import prepare_for_device
from ..runtime.process_group import device, init_distributed
from ..runtime.shared_teacher import run_shared_stage
from ..stages import STAGE_SPECS
from .pipeline import (
    FINETUNE,
    PIPELINE_DONE,
    PipelineRun,
    check_finished_stage,
    check_task_up_front,
    ensure_export,
    ensure_finetuned_teacher,
    finetune_step,
    initial_student,
    pipeline_steps,
    run_pipeline,
    stage_done,
    steps_to_run,
    with_paths,
)
from .report import build_students_report


def student_pipeline_recipe(recipe: Recipe, name: str, finetuned: str | None) -> Recipe:
    """Student `name` as a single-student recipe whose output_dir is OUT/<name>."""
    solo = with_paths(recipe.for_student(name), recipe.student.path, finetuned)
    return dataclasses.replace(solo, output_dir=str(Path(recipe.output_dir) / name))


def joint_stage(run: PipelineRun, stage: str) -> bool:
    """One general-corpus stage for every student not done with it; False when stopped."""
    starts, pending = {}, []
    for shape in run.recipe.students:
        solo = student_pipeline_recipe(run.recipe, shape.name, run.finetuned)
        folder = Path(solo.output_dir)
        start = initial_student(solo, folder, stage, run.skipped)
        staged = with_paths(solo, start, run.finetuned)
        staged.student.projections = None  # the file beside the start's folder, as the joint stage reads it
        done = stage_done(folder, stage)
        if done is not None:
            check_finished_stage(staged, stage, done, folder)
            ensure_export(folder, stage, done, run.rank)
            continue
        starts[shape.name] = start
        pending.append(shape.name)
    if not pending:
        run.say(f"{stage} already done for every student; skipping")
        return True
    if run.stopped_before(stage):
        return False
    run.say(f"{STAGE_SPECS[stage].title} ({stage}) for {', '.join(pending)} on one teacher pass")
    recipe = with_paths(run.recipe, run.recipe.student.path, run.finetuned)
    if not all(result.complete for result in run_shared_stage(recipe, stage, starts, only=pending)):
        run.say(f"stopped during {stage}; run the same command to resume")
        return False
    run.done.append(stage)
    return True


def run_students_pipeline(recipe: Recipe, first: int, last: int, skip: list[int]) -> bool:
    """run_pipeline for a recipe with `students:` (see the module); True when the range finished."""
    steps, skipped = steps_to_run(first, last, list(skip))
    check_task_up_front(recipe, [name for name, _ in steps])
    stop.install()
    rank, _world = init_distributed(recipe.train.dist_timeout_s, recipe.train.dist_backend)
    recipe = prepare_for_device(recipe, device())  # the `auto` keys for this device: skips compare them resolved
    out = Path(recipe.output_dir)
    names = [name for name, _ in steps]
    stages = [name for name in names if name in STAGE_SPECS]
    run = PipelineRun(recipe, out, rank, stages, stop.StopRequest(out), skipped, student=recipe.student.path)
    if FINETUNE in names:
        if not finetune_step(run, FINETUNE):
            return False
    else:
        run.finetuned, _ = ensure_finetuned_teacher(recipe, out, stages, allowed=False)
    for stage in (s for s in stages if STAGE_SPECS[s].data == "general"):
        if not joint_stage(run, stage):
            return False
    later = [s for s in stages if STAGE_SPECS[s].data != "general"]
    if later:
        order = [name for name, _ in pipeline_steps()]
        for shape in recipe.students:  # each student's task stages (and its report): its own pipeline
            solo = student_pipeline_recipe(recipe, shape.name, run.finetuned)
            run.say(f"student {shape.name}: {', '.join(later)} in {solo.output_dir}")
            if not run_pipeline(solo, order.index(later[0]), last, [i for i in skip if order[i] in later]):
                return False
    if rank == 0 and any(STAGE_SPECS[s].ships for s in stages):
        build_students_report(recipe, out)
    wait_for_rank0()
    finals = {shape.name: final_student(out / shape.name, stages) for shape in recipe.students}
    if rank == 0:  # what a script waits for, as after a single-student pipeline: every student by name
        atomic_write_text(out / PIPELINE_DONE, json.dumps({"range": [first, last], "skipped": list(skipped),
                                                            "stages": run.done, "students": finals}))
    run.say(f"done; students in {', '.join(finals.values())}")
    return True


def final_student(folder: Path, stages: list[str]) -> str:
    """The student a range left in a student's folder: what its own pipeline shipped (task stages), else
    the export of the last general stage the range ran (a range always runs a stage: steps_to_run)."""
    done = folder / PIPELINE_DONE
    if any(STAGE_SPECS[s].data != "general" for s in stages) and done.is_file():
        return json.loads(done.read_text())["student"]
    return str(folder / stages[-1] / "student")

"""Several students from one teacher pass: a general-corpus stage that trains every student of
`students:` on each micro-batch's one teacher forward (the frozen teacher is most of a stage-1 step).

    one loader; per micro-batch one teacher forward, capturing every layer any student's map reads
    -> for each student, under its own RNG state: runtime/step.py's student_step (its forward, loss,
       backward and optimizer step on its own engine)
    -> after each optimizer step: each student's losses queued and logged, checkpoints saved

Each student trains as its solo run would (same seed, same batches, equal losses): it is built
seeded as a solo run builds it, and its dropout draws from an RNG state of its own, swapped in
around its step and kept in its checkpoints. Its folder OUT/<name>/<stage>/ is a normal stage
folder (checkpoints/, metrics.jsonl, student/, projections, stage_done.json), so export, resume
and the later stages reuse the single-student code. All students save at the same steps (they
share the loader's position); a resume starts from the newest step every student has intact.
A non-finite loss skips that student's optimizer step only; the shared step count advances (that
student's schedule then runs a step ahead of its optimizer), and train.max_nonfinite_steps in a
row end the run, as in a solo run.
"""
from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..config import Recipe
from ..errors import ConfigError
from ..files import atomic_write_text
from ..stages import STAGE_SPECS
from . import checkpoint, rank_registry
from .checkpoint import rng_state, set_rng_state
from .checkpointer import Checkpointer, SaveSchedule
from .collectives import wait_for_rank0
from .device_defaults import prepare_for_device
from .flops import distill_step_flops, model_forward_flops, peak_flops
from .loop import (
    StageParts,
    StageResult,
    build_trainable,
    finish_stage,
    make_loader,
    ready_teacher,
    save_student_files,
    stage_teacher,
)
from .metrics import MetricsLogger
from .process_group import device, init_distributed
from .shared_folder import require_shared_folder
from .step import StepResult, Window, student_step, teacher_forward
from .stop import StopRequest
from .trackers import recipe_trackers
from .trainer import NonFiniteLoss, PendingStep, SkipNonFinite, Trainer, on_device


def student_folder(output_dir: str | Path, name: str, stage: str) -> Path:
    """OUT/<name>/<stage>: each student's stages in a folder laid out like a single-student output_dir."""
    return Path(output_dir) / name / stage


@dataclass
class Student:
    """One student of the joint stage: its parts (the teacher and loader shared), its loop state."""
    name: str
    stage: str
    recipe: Recipe                   # its single-student recipe of this stage
    out_dir: Path
    parts: StageParts
    checkpointer: Checkpointer
    step_flops: Callable[[int, int], float]  # (rows, length) -> its matmul FLOPs, its share of the teacher's
    trainer: Trainer | None = None   # its logger and non-finite policy (start_logging); the loop is here
    rng: dict = field(default_factory=dict)
    window: Window = field(default_factory=Window)
    pending: list = field(default_factory=list)
    last: dict = field(default_factory=lambda: {"loss": float("nan")})
    flops: float = 0.0

    @contextlib.contextmanager
    def own_rng(self):
        """Its dropout draws from its own RNG state, as in its solo run, whatever the others drew."""
        outside = rng_state()
        set_rng_state(self.rng)
        try:
            yield
        finally:
            self.rng = rng_state()
            set_rng_state(outside)

    def micro_step(self, batch: dict, teacher_out) -> StepResult:
        self.flops += self.step_flops(*batch["input_ids"].shape)
        with self.own_rng():
            return student_step(self.parts.engine, batch, teacher_out, window=self.window)

    def account(self, step: int, result: StepResult, tokens, positions: int, micro_batches: int) -> None:
        """The optimizer step `step` ended for this student: queued for the log, or counted as skipped."""
        flops, self.flops = self.flops, 0.0
        trainer = self.trainer
        if not result.finite:
            try:
                trainer.nonfinite.skip(step, result, trainer.logger, micro_batches)
            except NonFiniteLoss:
                self.log()
                raise
            return
        trainer.nonfinite.reset()
        self.pending.append(PendingStep.of(step, result, tokens, positions, flops, trainer.nonfinite.skipped))

    def log(self) -> None:
        self.last = self.trainer.log(self.pending) or self.last
        self.pending = []

    def save(self, step: int) -> None:
        with self.own_rng():  # its checkpoint keeps its own RNG state
            self.checkpointer.save(step)

    def start_logging(self, step: int, rank: int, peak: float | None) -> None:
        r, title = self.recipe.train, f"{STAGE_SPECS[self.stage].title} [{self.name}]"
        logger = MetricsLogger(self.out_dir, rank, r.max_steps, step, title, r.progress_bar, r.log_every,
                               peak_flops=peak, trackers=recipe_trackers(self.recipe))
        self.trainer = Trainer(None, self.checkpointer, logger, SkipNonFinite(r.max_nonfinite_steps, title),
                               flops=self.step_flops)


@dataclass
class Team:
    teacher: object
    teacher_capture: object
    loader: object
    students: list[Student]


def student_recipes(recipe: Recipe, stage: str, starts: dict[str, str | None] | None = None) -> dict[str, Recipe]:
    """Each student's single-student recipe of `stage`; `starts`: the folder each starts from (student.path)."""
    out = {}
    for shape in recipe.students:
        solo = recipe.for_student(shape.name)
        if starts is not None:
            solo.student.path = starts.get(shape.name)
            solo.student.projections = None  # the file beside student.path, as a pipeline's stage reads it
        out[shape.name] = solo.for_stage(stage)
    return out


def build_team(recipes: dict[str, Recipe], stage: str, rank: int, world: int) -> Team:
    """The shared teacher and loader, and each student built (seeded) as its solo run builds it."""
    spec = STAGE_SPECS[stage]
    first = next(iter(recipes.values()))
    tokenizer, teacher = stage_teacher(first, spec)
    sides = {name: build_trainable(r, spec, teacher.config, world) for name, r in recipes.items()}
    layers = sorted({layer for side in sides.values() for layer in side.mapping})
    teacher, capture = ready_teacher(teacher, first, spec, layers)
    loader = make_loader(first, spec, tokenizer, rank, world)
    shared_flops = model_forward_flops(teacher, 1, 1) * (1 - 1 / len(recipes))  # the others' share, per position
    students = []
    for name, r in recipes.items():
        side = sides[name]
        parts = StageParts(tokenizer, teacher, capture, side.student, side.objective, side.engine, side.ds_config,
                           loader, side.mapping, side.provenance)
        out_dir = student_folder(r.output_dir, name, stage)
        run = checkpoint.CheckpointedRun(side.engine, loader, out_dir / "checkpoints", what=f"{stage} [{name}]",
                                         recipe=checkpoint.RecipeRecord(side.provenance["recipe"]))
        schedule = SaveSchedule(r.train.save_every, r.train.max_steps, r.train.keep_checkpoints,
                                stop_at_step=r.train.stop_at_step)
        checkpointer = Checkpointer(run, schedule, StopRequest(r.output_dir),
                                    extra_files=lambda f, parts=parts: save_student_files(parts, f))

        def step_flops(rows, length, parts=parts):
            return distill_step_flops(parts, rows, length) - shared_flops * rows * length
        print(f"[rank {rank}] {spec.title} [{name}]: {side.student.config.num_hidden_layers} layers x "
              f"{side.student.config.hidden_size}, teacher layers {side.mapping} (one teacher pass reads {layers})",
              flush=True)
        students.append(Student(name, stage, r, out_dir, parts, checkpointer, step_flops))
    return Team(teacher, capture, loader, students)


def align_checkpoints(students: list[Student], rank: int) -> None:
    """Rank 0: every student resumes from the same step, the newest that all have intact. A save that
    stopped between students leaves some a step ahead; those newer checkpoints are removed (a joint
    run can never resume from them)."""
    if rank == 0:
        roots = [s.checkpointer.run.root for s in students]
        intact = [{t for t in checkpoint.complete_tags(root) if checkpoint.verify(root / t) is None} for root in roots]
        common = set.intersection(*intact)
        newest = max(common, key=checkpoint.step_of) if common else None
        for root, tags in zip(roots, intact):
            ahead = sorted(t for t in tags if newest is None or checkpoint.step_of(t) > checkpoint.step_of(newest))
            for tag in ahead:
                print(f"warning: {root / tag}: not every student reached this step; resuming all from "
                      f"{newest or 'the start'}", flush=True)
                shutil.rmtree(root / tag)
            if ahead:
                if newest is None:
                    (root / checkpoint.LATEST).unlink(missing_ok=True)
                else:
                    atomic_write_text(root / checkpoint.LATEST, newest)
    wait_for_rank0()


def resume_together(team: Team, rank: int, seed: int) -> int:
    """Each student restored from the same step (its engine and RNG; the shared loader's position is
    the same in each checkpoint), or seeded as a solo run is; returns the step."""
    align_checkpoints(team.students, rank)
    steps = set()
    for student in team.students:
        steps.add(checkpoint.resume_or_seed(student.checkpointer.run, rank, seed))
        student.rng = rng_state()  # what resume_or_seed restored or seeded: this student's alone from here on
    if len(steps) != 1:
        raise RuntimeError(f"the students resumed from different steps {sorted(steps)}")
    return steps.pop()


@dataclass
class JointFit:
    step: int
    batch: dict | None
    stopped: bool
    requested: bool  # a stop request (not train.stop_at_step) ended it


def fit_together(team: Team, batches, start: int, last_step: int, stop_request: StopRequest) -> JointFit:
    """Optimizer steps start+1..last_step of every student, one teacher forward per micro-batch.
    Collective: every rank calls it. Checking, logging and saving follow Trainer.fit's cadence."""
    lead = team.students[0]
    step, batch, micro_batches, tokens, positions = start, None, 0, 0, 0
    while step < last_step:
        batch = next(batches)
        teacher_out = teacher_forward(team.teacher, team.teacher_capture, batch)
        results = [student.micro_step(batch, teacher_out) for student in team.students]
        micro_batches, positions = micro_batches + 1, positions + batch["attention_mask"].numel()
        tokens = results[0].tokens + tokens
        if not results[0].boundary:  # one schedule: every student's engine accumulates the same micro-batches
            continue
        step += 1
        for student, result in zip(team.students, results):
            student.account(step, result, tokens, positions, micro_batches)
        micro_batches, tokens, positions = 0, 0, 0
        checking = lead.trainer.checking(step, last_step)
        if checking:
            for student in team.students:
                student.log()
        requested = checking and stop_request.requested()
        stopping = requested or step == lead.checkpointer.schedule.stop_at_step
        if stopping or lead.checkpointer.due(step):
            for student in team.students:
                student.save(step)
        if stopping:
            return JointFit(step, batch, True, requested)
    return JointFit(step, batch, False, False)


def run_shared_stage(recipe: Recipe, stage: str, starts: dict[str, str | None] | None = None,
                     only: list[str] | None = None) -> list[StageResult]:
    """The general-corpus stage `stage` for the students of `recipe.students` (`only`: these of them),
    each starting from `starts[name]` (default: the recipe's student.path), on one teacher pass per
    micro-batch; one StageResult per student, in order."""
    spec = STAGE_SPECS[stage]
    if spec.data != "general":
        raise ConfigError(f"students: only the general-corpus stages train several students together; {stage} "
                          "runs per student (pipeline does it)")
    staged = recipe.for_stage(stage)
    rank, world = init_distributed(staged.train.dist_timeout_s, staged.train.dist_backend)
    recipe = prepare_for_device(recipe, device())  # the `auto` keys for this device, before anything reads them
    recipes = {name: r for name, r in student_recipes(recipe, stage, starts).items() if only is None or name in only}
    first = next(iter(recipes.values()))
    out = Path(first.output_dir)
    require_shared_folder(out, rank, world)
    rank_registry.register(student_folder(out, next(iter(recipes)), stage) / ".ranks", rank, world)
    team = build_team(recipes, stage, rank, world)
    step = resume_together(team, rank, first.train.seed)
    peak = peak_flops(device(), first.train.precision, first.train.peak_tflops) if rank == 0 else None
    for student in team.students:
        student.start_logging(step, rank, peak)
    stop_request = StopRequest(first.output_dir)
    try:
        fit = fit_together(team, on_device(team.loader, device()), step, first.train.max_steps, stop_request)
    finally:
        for student in team.students:
            student.trainer.logger.close()
    if fit.step < first.train.max_steps:
        if rank == 0:
            why = "stop requested (STOP file or SIGUSR1)" if fit.requested else "train.stop_at_step"
            stop_request.clear()
            print(f"{spec.title}: stopped at step {fit.step} of {first.train.max_steps} ({why}); checkpoints saved; "
                  f"run the same command again to continue", flush=True)
        return [StageResult(stage, fit.step, s.last["loss"], s.out_dir / "student", complete=False)
                for s in team.students]
    results = []
    for student in team.students:
        with student.own_rng():
            student.checkpointer.ensure_saved(fit.step)
        loss = finish_stage(student.recipe, spec, student.parts, student.out_dir, fit.step, student.last["loss"],
                            fit.batch, rank, world)
        results.append(StageResult(stage, fit.step, loss, student.out_dir / "student"))
    return results

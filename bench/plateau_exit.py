"""When does stage 4 leave the plateau? For each run of bench/progressive.py (or any pipeline output_dir),
the first stage-4 step at which the mean hard-label loss of the last --window steps falls below
--below, from the run's task_specific/metrics.jsonl, and the same in per-task steps (the steps of the
per-task stages that ran before stage 4 added: the cost a schedule pays before that point).

A task head trained from scratch first predicts the labels' prior (a classifier: cross-entropy at the
prior's entropy, ln K for K balanced classes; a regression head: MSE at the labels' variance) and sits
there for a while before the loss falls: BENCHMARKS section 2 calls that the plateau.

    python bench/plateau_exit.py runs/middle-stages/similarity --below 1.0    # MSE; label variance 2.86
    python bench/plateau_exit.py runs/middle-stages/coherence --below 0.9     # CE; ln 3 = 1.099
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

PER_TASK_STAGES = ("general_enhanced", "task_adaptive")  # what a schedule may run before stage 4, per task


def exit_step(rows: list[dict], below: float, window: int) -> int | None:
    losses = [row["hard_label"] for row in rows]
    for end in range(window, len(losses) + 1):
        if statistics.mean(losses[end - window:end]) < below:
            return rows[end - 1]["step"]
    return None


def steps_before(run: Path) -> int:
    """Steps of the per-task stages the shipped student passed through before stage 4 (report.json lists
    the stages it passed through, a skipped stage's old folder left out)."""
    stages = json.loads((run / "report.json").read_text())["stages"]
    return sum(stage["steps"] for stage in stages if stage["name"] in PER_TASK_STAGES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task_folder", type=Path, help="a task's folder of bench/progressive.py: VARIANT/seedN/")
    parser.add_argument("--below", type=float, required=True, help="the hard-label loss that counts as left")
    parser.add_argument("--window", type=int, default=10)
    args = parser.parse_args()
    print(f"| variant | seed | stage-4 steps | final {args.window}-step mean | left the plateau at stage-4 step "
          f"| in per-task steps |\n|---|---|---|---|---|---|")
    for metrics in sorted(args.task_folder.glob("*/seed*/task_specific/metrics.jsonl")):
        run = metrics.parent.parent
        if not (run / "report.json").is_file():  # not finished: its stage 4 may still be running
            print(f"| {run.parent.name} | {run.name} | not finished | | | |")
            continue
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        step = exit_step(rows, args.below, args.window)
        final = statistics.mean(row["hard_label"] for row in rows[-args.window:])
        per_task = "-" if step is None else step + steps_before(run)
        print(f"| {run.parent.name} | {run.name} | {len(rows)} | {final:.3f} | {step or 'not left'} | {per_task} |")


if __name__ == "__main__":
    main()

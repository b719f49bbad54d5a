"""Two students from one teacher pass (recipe key `students:`) against the same two trained one after
the other, on the same batches, side by side in one process.

    python bench/multi_student.py                                  # BERT-base -> 4L-312 + 6L-384, L=128
    python bench/multi_student.py --second 6,768,12,3072           # the GPU-serving size as the second
    python bench/multi_student.py --batch 32 --steps 10 --rounds 3  # on a GPU
    python bench/multi_student.py --student-dropout 0              # bound: no dropout mask to draw

together   the joint stage's parts and step (runtime/shared_teacher.py: build_team, one teacher
           forward per batch, then each student's student_step under its own RNG state)
in turn    each student's own single-student stage (runtime/loop.py build_parts, runtime/step.py
           train_step): its own teacher forward every batch, first student A's steps, then B's

Both sides train from the same seeded start on the same real batches (the general stage's loader on
the bundled corpus). Rounds alternate which side goes first; each round times --steps optimizer
steps per side (after --warmup untimed ones), so on a loaded machine short rounds (--steps 1) put
both sides under the same load. The ratio is the sides' total times over all rounds (the median
and range of the per-round ratios beside it). Every step's loss of each
student is compared between the sides: together must equal in turn within float tolerance, or the
run fails. Dropout is on (0.1, as BERT's), so the comparison covers each student's RNG stream.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

TEACHER = (768, 12, 12, 3072)  # BERT-base: hidden, layers, heads, ffn
FIRST = (4, 312, 12, 1200)     # ERNIE-Tiny: layers, hidden, heads, ffn


def shape(text: str) -> tuple[int, int, int, int]:
    parts = [int(v) for v in text.split(",")]
    if len(parts) != 4:
        raise argparse.ArgumentTypeError("a shape is layers,hidden,heads,ffn")
    return tuple(parts)


def recipe_for(args):
    from ernie_tiny_ds.config import from_dict

    hidden, layers, heads, ffn = TEACHER
    students = [{"name": name, "num_hidden_layers": s[0], "hidden_size": s[1], "num_attention_heads": s[2],
                 "intermediate_size": s[3]} for name, s in (("first", FIRST), ("second", args.second))]
    return from_dict({
        "output_dir": args.workdir,
        "teacher": {"config": {"model_type": "bert", "vocab_size": 30522, "hidden_size": hidden,
                               "num_hidden_layers": layers, "num_attention_heads": heads, "intermediate_size": ffn,
                               "max_position_embeddings": 512}},
        "students": students,
        "data": {"max_seq_len": args.seq_len},
        "train": {"max_steps": 10 ** 6, "micro_batch_size": args.batch, "precision": args.precision,
                  "progress_bar": False, "seed": args.seed},
        "optim": {"lr": 1e-4, "warmup_ratio": 0.0},
    })


class InTurn:
    """Each student's own single-student stage parts, each stepped under its own RNG state."""

    def __init__(self, recipes: dict, start_rng: dict):
        from ernie_tiny_ds.runtime.loop import build_parts
        from ernie_tiny_ds.stages import STAGE_SPECS

        self.parts = {name: build_parts(r, STAGE_SPECS["general"], rank=0, world=1) for name, r in recipes.items()}
        self.rng = {name: copy.deepcopy(start_rng) for name in recipes}

    def run(self, batches: list[dict]) -> dict[str, list[float]]:
        from ernie_tiny_ds.runtime.checkpoint import rng_state, set_rng_state
        from ernie_tiny_ds.runtime.step import train_step

        losses = {}
        for name, parts in self.parts.items():  # A's steps, then B's
            set_rng_state(self.rng[name])
            losses[name] = [train_step(parts, batch).total for batch in batches]
            self.rng[name] = rng_state()
        return {name: [float(v) for v in values] for name, values in losses.items()}


class Together:
    def __init__(self, recipes: dict, start_rng: dict):
        from ernie_tiny_ds.runtime.shared_teacher import build_team

        self.team = build_team(recipes, "general", rank=0, world=1)
        for student in self.team.students:
            student.rng = copy.deepcopy(start_rng)

    def run(self, batches: list[dict]) -> dict[str, list[float]]:
        from ernie_tiny_ds.runtime.step import teacher_forward

        losses = {s.name: [] for s in self.team.students}
        for batch in batches:
            teacher_out = teacher_forward(self.team.teacher, self.team.teacher_capture, batch)
            for student in self.team.students:
                losses[student.name].append(student.micro_step(batch, teacher_out).total)
        return {name: [float(v) for v in values] for name, values in losses.items()}


def set_student_dropout(models: list[torch.nn.Module], p: float) -> None:
    """Every dropout of these students (embeddings, attention probabilities, hidden states) at rate p.
    BERT's attention reads its probability dropout from the same module's p, so one loop sets all."""
    for model in models:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = p


def timed(side, batches: list[dict]) -> tuple[float, dict[str, list[float]]]:
    start = time.perf_counter()
    losses = side.run(batches)  # float() of each loss: the device has finished when this returns
    return time.perf_counter() - start, losses


def phases(team, batches: list[dict]) -> None:
    """Where a joint step's time goes: the shared teacher forward against each student's own step (forward,
    losses, backward, optimizer), then the profiler's top ops of one more step of the first student.
    The first batch warms up, the last is timed."""
    from torch.profiler import ProfilerActivity, profile

    from ernie_tiny_ds.runtime.step import teacher_forward

    def clock(fn):
        start = time.perf_counter()
        out = fn()
        return time.perf_counter() - start, out

    for batch in batches:
        teacher_s, teacher_out = clock(lambda: teacher_forward(team.teacher, team.teacher_capture, batch))
        student_s = {s.name: clock(lambda s=s: s.micro_step(batch, teacher_out))[0] for s in team.students}
    print(f"phases: teacher forward {teacher_s:.2f} s; "
          + "; ".join(f"student {name} step {t:.2f} s" for name, t in student_s.items()))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        team.students[0].micro_step(batches[-1], teacher_out)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def compare(together: dict, in_turn: dict, rtol: float) -> float:
    """The largest relative difference of any student's step loss; fails beyond `rtol`."""
    worst = 0.0
    for name in together:
        for step, (a, b) in enumerate(zip(together[name], in_turn[name])):
            diff = abs(a - b) / max(abs(b), 1e-12)
            worst = max(worst, diff)
            if diff > rtol:
                raise SystemExit(f"student {name} step {step}: together {a!r} != in turn {b!r} (rel {diff:.3g})")
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--second", type=shape, default=(6, 384, 12, 1536),
                        help="the second student: layers,hidden,heads,ffn (default 6L-384, MiniLM-L6-H384)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=1, help="timed optimizer steps per side per round")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--workdir", default="/tmp/bench_multi_student")
    parser.add_argument("--student-dropout", type=float, metavar="P",
                        help="every student dropout at this rate (default: BERT's 0.1); 0 measures the bound a "
                             "cheaper dropout could reach, as drawing the masks is the students' largest "
                             "non-matmul cost on a CPU (--phases shows it)")
    parser.add_argument("--phases", action="store_true",
                        help="after the rounds: one teacher forward and each student's step timed apart, and the "
                             "torch profiler's top ops of the first student's step")
    args = parser.parse_args()

    from ernie_tiny_ds.runtime.checkpoint import rng_state
    from ernie_tiny_ds.runtime.device_defaults import prepare_for_device
    from ernie_tiny_ds.runtime.process_group import device, init_distributed
    from ernie_tiny_ds.runtime.shared_teacher import student_recipes

    init_distributed(600)
    # the `auto` keys resolved for the device, as runtime/shared_teacher.run_shared_stage resolves them
    recipes = student_recipes(prepare_for_device(recipe_for(args), device()), "general")
    torch.manual_seed(args.seed)  # what a fresh stage seeds on rank 0: every student's dropout starts here
    start_rng = rng_state()
    together, in_turn = Together(recipes, start_rng), InTurn(recipes, start_rng)
    if args.student_dropout is not None:
        set_student_dropout([s.parts.student for s in together.team.students]
                            + [parts.student for parts in in_turn.parts.values()], args.student_dropout)
    loader = iter(together.team.loader)
    dev = device()
    take = lambda n: [{k: v.to(dev) for k, v in next(loader).items()} for _ in range(n)]  # noqa: E731

    warm = take(args.warmup)
    worst = compare(together.run(warm), in_turn.run(warm), args.rtol)
    rounds = []
    for index in range(args.rounds):
        batches = take(args.steps)
        sides = [("together", together), ("in_turn", in_turn)]
        if index % 2:
            sides.reverse()
        times, losses = {}, {}
        for label, side in sides:
            times[label], losses[label] = timed(side, batches)
        worst = max(worst, compare(losses["together"], losses["in_turn"], args.rtol))
        rounds.append(times)
        print(f"round {index}: together {times['together']:.2f} s, in turn {times['in_turn']:.2f} s "
              f"({times['together'] / times['in_turn']:.3f}x)", flush=True)
    if args.phases:
        phases(together.team, take(2))
    total = {label: sum(r[label] for r in rounds) for label in ("together", "in_turn")}
    per_round = [r["together"] / r["in_turn"] for r in rounds]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    result = {"teacher": "12L-768", "students": ["4L-312", f"{args.second[0]}L-{args.second[1]}"],
              "student_dropout": args.student_dropout if args.student_dropout is not None else "recipe",
              "seq_len": args.seq_len, "batch": args.batch, "steps_per_round": args.steps, "rounds": args.rounds,
              "device": str(dev), "threads": torch.get_num_threads(), "machine": platform.machine(),
              "together_s": round(total["together"], 3), "in_turn_s": round(total["in_turn"], 3),
              "ratio": round(total["together"] / total["in_turn"], 3),
              "round_ratio_median": round(statistics.median(per_round), 3),
              "round_ratio_range": [round(min(per_round), 3), round(max(per_round), 3)], "max_rel_loss_diff": worst,
              "commit": commit}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    from ernie_tiny_ds.runtime.deepspeed_startup import skip_mlflow_in_deepspeed_import
    skip_mlflow_in_deepspeed_import()  # as the CLI does: DeepSpeed's import then skips mlflow's second
    main()

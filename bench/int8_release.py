"""fp32 vs int8 ONNX graph of a trained student: dev score, file size, latency at batch 1 and 32.

    python bench/int8_release.py --model runs/demo/task_specific/student --task sentiment --seq-len 64 --threads 1
    python bench/int8_release.py --model DIR --config RECIPE --repeats 20 --seq-len 64

The student (an exported classifier folder, e.g. a pipeline's OUT/task_specific/student) is exported
to model.onnx and quantised to model.int8.onnx in a temporary folder, exactly as `release.int8: true`
does in the report (workflows/onnx_export.py, workflows/onnx_int8.py). The fp32 score is the PyTorch
student's (workflows/evaluate.py; the fp32 graph matches it within 1e-4), the int8 score the int8
graph's under ONNX Runtime on the same dev batches. Both graphs are timed in turns in one process
(speed.timed_in_turns: medians after warm-ups, random token ids, no padding).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ernie_tiny_ds.config import TaskConfig, load_recipe  # noqa: E402
from ernie_tiny_ds.data.tasks import load_task  # noqa: E402
from ernie_tiny_ds.runtime.export import load_exported  # noqa: E402
from ernie_tiny_ds.workflows.evaluate import evaluate_model  # noqa: E402
from ernie_tiny_ds.workflows.onnx_export import OrtModel, export_onnx  # noqa: E402
from ernie_tiny_ds.workflows.onnx_int8 import quantize_int8, release_section  # noqa: E402
from ernie_tiny_ds.workflows.speed import _threads, timed_in_turns  # noqa: E402


def graphs_timed(fp32: dict, int8: dict, config, seq_len: int, repeats: int, threads: int | None) -> tuple[dict, dict]:
    with _threads(threads) as used:
        runners = [OrtModel(Path(fp32["path"]), config, used), OrtModel(Path(int8["path"]), config, used)]
        timings = timed_in_turns(runners, seq_len, torch.device("cpu"), seed=0, warmup=3, repeats=repeats)
    return {**fp32, **timings[0]}, {**int8, **timings[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an exported classifier folder (OUT/task_specific/student)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", help="a bundled task name (sentiment, pair, similarity, coherence)")
    source.add_argument("--config", help="a recipe whose task section scores the student")
    parser.add_argument("--seq-len", type=int, default=None, help="timing length (default: the task's max_seq_len)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: torch's count)")
    args = parser.parse_args()
    if args.config:
        task_cfg = load_recipe(args.config, []).task
    else:  # --seq-len is then the task's max_seq_len too, as the report scores and times at task.max_seq_len
        task_cfg = TaskConfig(name=args.task, **({"max_seq_len": args.seq_len} if args.seq_len else {}))
    main_metric = load_task(task_cfg).main_metric
    student = {"path": args.model, "metrics": evaluate_model(args.model, task_cfg)}
    module = load_exported(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(module, Path(tmp) / "model.onnx")
        int8 = quantize_int8(Path(fp32["path"]), module)
        fp32, int8 = graphs_timed(fp32, int8, module.config, args.seq_len or task_cfg.max_seq_len, args.repeats,
                                  args.threads)
        row = release_section({"student": fp32, "student_int8": int8}, student, task_cfg, main_metric)
    row["machine"] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                      "cpus": os.cpu_count(), "threads": args.threads or torch.get_num_threads(),
                      "torch": torch.__version__, "onnxruntime": __import__("onnxruntime").__version__,
                      "seq_len": args.seq_len or task_cfg.max_seq_len, "repeats": args.repeats,
                      "date": str(date.today())}
    print(json.dumps(row, indent=2))
    print(f"| graph | dev {main_metric} | size (MiB) | batch 1 (ms) | batch 32 (ms) |")
    print("|---|---|---|---|---|")
    for name in ("fp32", "int8"):
        g = row[name]
        print(f"| {name} | {g['metrics'][main_metric]:.4f} | {g['size_mib']:.1f} | {g['latency_ms_batch1']:.2f} | "
              f"{g['latency_ms_batch32']:.1f} |")
    print(f"| int8 / fp32 | {row['retained']:.1%} retained | {1 / row['size_ratio']:.2f}× | "
          f"{row['speedup_batch1']:.2f}× faster | {row['speedup_batch32']:.2f}× faster |")


if __name__ == "__main__":
    main()

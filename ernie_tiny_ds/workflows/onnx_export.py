"""ONNX deployment of an exported model: model.onnx with dynamic batch and sequence axes, checked
against PyTorch under ONNX Runtime, and timed beside PyTorch.

    ernie-tiny-ds onnx --model OUT/task_specific/student            # writes OUT/task_specific/student/model.onnx
    ernie-tiny-ds onnx --model S --teacher T --seq-len 128           # + PyTorch vs ONNX Runtime timings of both
    ernie-tiny-ds onnx --model S --int8                              # + S/model.int8.onnx (onnx_int8.py)

torch.onnx's dynamo exporter (opset 18) is used: the TorchScript one (dynamo=False) mis-traces
transformers 5's BERT (outputs off by ~1e-2 even on the traced input), the dynamo graph matches to ~1e-8.
"""
from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..files import replaced_atomically
from ..outputs import claim_file
from ..runtime.export import load_exported
from .speed import _inputs, _threads, timed_in_turns

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
ONNX_FILE = "model.onnx"
OPSET = 18
CHECK_TOLERANCE = 1e-4  # fp32 graph vs fp32 PyTorch: anything above is a broken export, not rounding


def require_onnx() -> None:
    """The onnx extra is optional: say how to get it instead of a traceback."""
    missing = []
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(f"ONNX export needs {', '.join(missing)}: pip install 'ernie-tiny-ds[onnx]'")


def onnx_available() -> bool:
    try:
        require_onnx()
        return True
    except UserError:
        return False


class _Outputs(nn.Module):
    """What a user reads, as one tensor: logits for a task head, else the last hidden state."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.has_head = model.config.architectures is not None and any(
            a.endswith("ForSequenceClassification") for a in model.config.architectures)

    def forward(self, input_ids, attention_mask, token_type_ids):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out.logits if self.has_head else out.last_hidden_state


def _load(model) -> nn.Module:
    if isinstance(model, nn.Module):
        return model.eval()
    folder = Path(model)
    if not (folder / "config.json").is_file():
        raise UserError(f"--model: {folder} is not an exported Hugging Face model folder (no config.json)")
    return load_exported(folder)


def _padded_example(config, batch: int, seq_len: int, seed: int) -> dict[str, torch.Tensor]:
    x = _inputs(config, batch, seq_len, torch.device("cpu"), seed)
    x["attention_mask"][0, seq_len * 3 // 4:] = 0  # one padded row, so the mask is part of the check
    return x


class OrtModel:
    """An ONNX Runtime session that speed.timed_in_turns can time like a module: .config and
    __call__(**inputs)."""

    def __init__(self, path: Path, config, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()  # the same budget as PyTorch
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.config = config
        self.names = [i.name for i in self.session.get_inputs()]

    def __call__(self, **inputs):
        return self.session.run(None, {k: inputs[k].cpu().numpy() for k in self.names})[0]


def check_against_pytorch(path: Path, module: nn.Module, seq_len: int = 24, batch: int = 3, seed: int = 1) -> float:
    """Max |ONNX Runtime - PyTorch| on a batch and length unlike the export example (dynamic axes), padded."""
    seq_len = min(seq_len, module.config.max_position_embeddings)
    x = _padded_example(module.config, batch, seq_len, seed)
    with torch.no_grad():
        expected = _Outputs(module)(**x).float().numpy()
    got = OrtModel(path, module.config)(**x)
    if got.shape != expected.shape:
        raise UserError(f"{path}: ONNX output shape {got.shape} differs from PyTorch's {expected.shape}")
    return float(abs(got - expected).max())


def export_onnx(model, output: str | os.PathLike, opset: int = OPSET, tolerance: float = CHECK_TOLERANCE) -> dict:
    """Write `output` (model.onnx) for an exported model folder (or module) and check it with ONNX Runtime.
    Returns {path, opset, max_abs_diff, seconds}."""
    require_onnx()
    if opset < 17:
        raise UserError(f"--opset {opset}: ONNX export needs opset 17 or newer (LayerNormalization)")
    module = _load(model)
    wrapper = _Outputs(module).eval()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    example = _padded_example(module.config, 2, min(16, module.config.max_position_embeddings), seed=0)
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUT_NAMES}
    out_name = "logits" if wrapper.has_head else "last_hidden_state"
    axes[out_name] = {0: "batch"} if wrapper.has_head else {0: "batch", 1: "sequence"}
    start = time.perf_counter()
    with replaced_atomically(output) as tmp:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation chatter, not the user's business
            torch.onnx.export(wrapper, tuple(example[k] for k in INPUT_NAMES), str(tmp), input_names=list(INPUT_NAMES),
                              output_names=[out_name], dynamic_axes=axes, opset_version=opset, dynamo=True,
                              external_data=False, verbose=False)
        diff = check_against_pytorch(tmp, module)
        if diff > tolerance:
            raise UserError(f"{output}: the ONNX graph differs from PyTorch by {diff:.3g} (> {tolerance}); not written")
    return {"path": str(output), "opset": opset, "max_abs_diff": diff,
            "seconds": round(time.perf_counter() - start, 1)}


def compare_runtimes(teacher, student, teacher_onnx: Path, student_onnx: Path, seq_len: int = 128,
                     repeats: int = 10, warmup: int = 3, threads: int | None = None, seed: int = 0,
                     student_int8: Path | None = None) -> dict:
    """Teacher and student under PyTorch and ONNX Runtime (CPU), and the student's int8 graph when given,
    all timed in turns in one process (speed.timed_in_turns): batch-1 latency, batch-32 latency
    and throughput."""
    modules = [_load(teacher), _load(student)]
    runners = [*(_Outputs(m).eval() for m in modules)]
    for runner, module in zip(runners, modules):
        runner.config = module.config
    names = [("pytorch", "teacher"), ("pytorch", "student"), ("onnxruntime", "teacher"), ("onnxruntime", "student")]
    with _threads(threads) as used, torch.no_grad():
        runners += [OrtModel(Path(teacher_onnx), modules[0].config, used),
                    OrtModel(Path(student_onnx), modules[1].config, used)]
        if student_int8 is not None:
            runners.append(OrtModel(Path(student_int8), modules[1].config, used))
            names.append(("onnxruntime", "student_int8"))
        timings = timed_in_turns(runners, seq_len, torch.device("cpu"), seed, warmup, repeats)
    result: dict = {"pytorch": {}, "onnxruntime": {}}
    for (runtime, who), timing in zip(names, timings):
        result[runtime][who] = timing
    for runtime in ("pytorch", "onnxruntime"):
        r = result[runtime]
        r["speedup"] = r["teacher"]["latency_ms_batch1"] / r["student"]["latency_ms_batch1"]
    result["settings"] = {"seq_len": seq_len, "threads": used, "repeats": repeats, "warmup": warmup}
    return result


def report_section(teacher_dir: str, student_dir: str, out: Path, seq_len: int, int8: bool = False) -> dict:
    """For the report: model.onnx in the student's folder (shipped with it), the teacher's graph under
    OUT/onnx/, both checked, with int8 the student's model.int8.onnx beside its model.onnx, then all
    graphs and both PyTorch models timed side by side."""
    student_onnx = export_onnx(student_dir, Path(student_dir) / ONNX_FILE)
    teacher_onnx = export_onnx(teacher_dir, out / "onnx" / "teacher" / ONNX_FILE)
    quantised = None
    if int8:
        from .onnx_int8 import quantize_int8
        quantised = quantize_int8(Path(student_onnx["path"]), _load(student_dir))
    timing = compare_runtimes(teacher_dir, student_dir, Path(teacher_onnx["path"]), Path(student_onnx["path"]),
                              seq_len=seq_len, student_int8=quantised and Path(quantised["path"]))
    ort = timing["onnxruntime"]
    graphs = {"teacher": teacher_onnx, "student": student_onnx}
    section = {**{who: {**ort[who], "path": g["path"], "max_abs_diff": g["max_abs_diff"]} for who, g in graphs.items()},
               "speedup": ort["speedup"], "pytorch_same_run": timing["pytorch"], "opset": student_onnx["opset"],
               "settings": timing["settings"]}
    if quantised is not None:
        section["student_int8"] = {**ort["student_int8"], **quantised}
    return section


def written_line(result: dict) -> str:
    """What the `onnx` command and `export --onnx` print about the graph export_onnx wrote."""
    return (f"wrote {result['path']} (opset {result['opset']}, {result['seconds']}s); ONNX Runtime vs PyTorch "
            f"max abs diff {result['max_abs_diff']:.3g}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="an exported Hugging Face folder (e.g. OUT/task_specific/student)")
    parser.add_argument("--output", help=f"the .onnx file (default: MODEL/{ONNX_FILE})")
    parser.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset, 17 or newer (default {OPSET})")
    parser.add_argument("--teacher", help="also time this model folder against MODEL under PyTorch and ONNX Runtime "
                                          "(its graph goes beside --output as teacher.onnx)")
    parser.add_argument("--seq-len", type=int, default=128, help="timing: tokens per sequence (default 128)")
    parser.add_argument("--repeats", type=int, default=10, help="timing: repetitions per model (default 10)")
    parser.add_argument("--threads", type=int, default=None, help="timing: threads for both runtimes")
    parser.add_argument("--int8", action="store_true",
                        help="also write the graph's dynamic int8 quantisation beside it (model.int8.onnx; timed "
                             "with --teacher)")


def run(args) -> int:
    output = Path(args.output) if args.output else Path(args.model) / ONNX_FILE
    models = {"--model": args.model, "--teacher": args.teacher}
    claim_file(output, "--output", models, home=args.model)  # MODEL/model.onnx is the graph's home
    if args.teacher:
        claim_file(output.with_name("teacher.onnx"), "--output", models, home=args.model)
    if args.int8:
        from .onnx_int8 import int8_path
        claim_file(int8_path(output), "--output", models, home=args.model)
    result = export_onnx(args.model, output, opset=args.opset)
    print(written_line(result), flush=True)
    quantised = None
    if args.int8:
        from .onnx_int8 import int8_written_line, quantize_int8
        quantised = quantize_int8(output, _load(args.model))
        print(int8_written_line(quantised), flush=True)
    if args.teacher:
        teacher = export_onnx(args.teacher, output.with_name("teacher.onnx"), opset=args.opset)
        timing = compare_runtimes(args.teacher, args.model, Path(teacher["path"]), output, seq_len=args.seq_len,
                                  repeats=args.repeats, threads=args.threads,
                                  student_int8=quantised and Path(quantised["path"]))
        timing["max_abs_diff"] = {"teacher": teacher["max_abs_diff"], "student": result["max_abs_diff"],
                                  **({"student_int8": quantised["max_abs_diff"]} if quantised else {})}
        print(json.dumps(timing, indent=2), flush=True)
    return 0

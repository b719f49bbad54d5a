"""FLOPs of a training step and the device's peak rate: the numbers behind tflops and MFU in the log.

Counted: matrix products only (elementwise ops, softmax, LayerNorm and the embedding lookup, a
gather, are left out, as in the usual MFU convention). For a BERT-style encoder over B sequences
of L tokens (L: the padded length the kernels actually run), hidden h, FFN f, per layer:
    linear layers  2 * B*L * (4*h*h + 2*h*f)      Q, K, V, attention output; FFN in and out
    attention      2 * 2 * B * L*L * h            scores Q K^T and the weighted sum of V
plus the pooler (2*B*h*h) and a task head (2*B*h*classes) where the model runs them.
A distillation step = teacher forward (only the layers it runs: up to the deepest mapped layer
when the stage reads no logits) + 3 x (student forward + the projections to the teacher width):
the backward costs two forwards.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import re
import time
from pathlib import Path

import torch

from ..distill.models import base_model
from ..files import atomic_write_text

# Dense peak TFLOP/s per GPU by torch.cuda.get_device_name(), first match wins (A100 before A10).
# "16bit": bf16/fp16 tensor cores. "fp32": the plain fp32 (non-tensor-core) rate, because this
# package leaves torch's default fp32 matmul precision alone (no TF32); where a GPU lacks bf16
# (V100, T4) the fp16 tensor-core figure stands for 16-bit training.
PEAK_TFLOPS = (
    (r"H100.*PCIe", {"16bit": 756.0, "fp32": 51.0}),
    (r"H100|H200|GH200", {"16bit": 989.0, "fp32": 67.0}),    # SXM
    (r"A100", {"16bit": 312.0, "fp32": 19.5}),
    (r"L40S", {"16bit": 362.0, "fp32": 91.6}),
    (r"\bA10\b", {"16bit": 125.0, "fp32": 31.2}),
    (r"V100", {"16bit": 125.0, "fp32": 15.7}),
    (r"\bT4\b", {"16bit": 65.0, "fp32": 8.1}),
)


# --------------------------------------------------------------------------- counts
def encoder_forward_flops(config, batch: int, seq_len: int, layers: int | None = None, pooler: bool = False,
                          classes: int = 0) -> float:
    """Forward FLOPs of a BERT-style encoder from its config (`layers`: how many of its layers run)."""
    h, f = config.hidden_size, config.intermediate_size
    n = config.num_hidden_layers if layers is None else layers
    tokens = batch * seq_len
    per_layer = 2 * tokens * (4 * h * h + 2 * h * f) + 2 * 2 * batch * seq_len * seq_len * h
    head = (2 * batch * h * h if pooler else 0) + 2 * batch * h * classes
    return float(n * per_layer + head)


def model_forward_flops(model: torch.nn.Module, batch: int, seq_len: int) -> float:
    """Forward FLOPs of a model as built: the layers it holds (a truncated teacher runs fewer than
    its config says), its pooler and its task head if it has them."""
    model = getattr(model, "module", model)  # a DeepSpeed (ZeRO-3 inference) engine
    body = base_model(model)
    classifier = getattr(model, "classifier", None)
    return encoder_forward_flops(model.config, batch, seq_len, layers=len(body.encoder.layer),
                                 pooler=getattr(body, "pooler", None) is not None,
                                 classes=model.config.num_labels if classifier is not None else 0)


def distill_step_flops(parts, batch: int, seq_len: int) -> float:
    """One micro-batch of a distillation stage (StageParts): teacher forward + 3 x (student forward
    + the hidden and embedding projections the objective applies)."""
    objective = parts.objective
    weights = objective.weights()
    applied = ("embedding" in weights) + ("hidden" in weights) * len(parts.mapping)
    proj = objective.hidden_proj
    projections = 2 * batch * seq_len * proj.in_features * proj.out_features * applied
    student = model_forward_flops(parts.student, batch, seq_len) + projections
    return model_forward_flops(parts.teacher, batch, seq_len) + 3 * student


def finetune_step_flops(model: torch.nn.Module, batch: int, seq_len: int) -> float:
    """One micro-batch of teacher finetuning: forward + backward of the classifier."""
    return 3 * model_forward_flops(model, batch, seq_len)


# --------------------------------------------------------------------------- peak rate
def table_peak_flops(device_name: str, precision: str) -> float | None:
    """Dense peak FLOP/s of a known GPU in the training precision, None for one not in the table."""
    for pattern, figures in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return figures["fp32" if precision == "fp32" else "16bit"] * 1e12
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _matmul_rate(a: torch.Tensor, b: torch.Tensor, loops: int) -> float:
    """The best of `loops` timed loops of at least 5 products and 0.05 s each, in FLOP/s."""
    n, device = a.shape[0], a.device
    best = 0.0
    for _ in range(loops):
        reps, start = 0, time.perf_counter()
        while True:
            a @ b
            reps += 1
            if reps >= 5:
                _sync(device)
                if time.perf_counter() - start >= 0.05:
                    break
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - start))
    return best


def _peak_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ernie-tiny-ds" / "matmul_peak.json"


def _peak_key(device: torch.device, dtype: torch.dtype) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return f"{device.type} {name} | {dtype} | {torch.get_num_threads()} threads | torch {torch.__version__}"


def _read_peaks(path: Path) -> dict:
    try:
        peaks = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # none yet, unreadable or damaged: measured afresh and rewritten
    return peaks if isinstance(peaks, dict) else {}


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(device_type: str, dtype: torch.dtype, device_index: int | None = None) -> float:
    """Dense matmul FLOP/s of this device in `dtype`, measured once per process (cached) and kept per
    machine (~/.cache/ernie-tiny-ds/matmul_peak.json, by device, dtype, threads and torch version).

    The first measurement on a machine is the best of five short timed torch.matmul loops: the best, not
    one loop, because a loop that shares the cores with a starting peer rank or another job reads low, and
    every MFU of the run divides by it. Later runs time one loop and keep the best figure ever measured,
    so a reading taken under load is replaced by the next quiet one instead of lasting a whole run (one
    loaded probe gave CPU MFUs above 100% while a test suite ran beside the training), and a run starts
    0.5 s sooner on a CPU (the five loops of 1024 x 1024 products)."""
    device = torch.device(device_type, device_index) if device_index is not None else torch.device(device_type)
    n = 4096 if device.type == "cuda" else 1024
    # operands without the global RNG: drawing from it would shift dropout and data order, and a
    # resumed run would no longer equal an uninterrupted one
    a = torch.linspace(-1.0, 1.0, n * n, device=device, dtype=torch.float32).reshape(n, n).to(dtype)
    b = a.flip(0).t().contiguous()
    for _ in range(2):  # warm-up: allocator, kernel selection, thread pool
        a @ b
    _sync(device)
    path, key = _peak_cache(), _peak_key(device, dtype)
    known = _read_peaks(path).get(key)
    known = known if isinstance(known, (int, float)) and known > 0 else None
    rate = _matmul_rate(a, b, loops=1 if known else 5)
    if known is None or rate > known:
        _keep_best(path, key, rate)
    return max(rate, known or 0.0)


def _keep_best(path: Path, key: str, rate: float) -> None:
    """Record `rate` under `key` unless the file already holds a better one (re-read just before: ranks
    and jobs on one machine may probe at once; each write is whole, atomic)."""
    peaks = _read_peaks(path)
    if isinstance(peaks.get(key), (int, float)) and peaks[key] >= rate:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({**peaks, key: rate}, indent=1))
    except OSError:
        pass  # no writable cache folder: this run's own figure still stands


def peak_flops(device: torch.device, precision: str, override_tflops: float | None = None) -> float:
    """The MFU denominator in FLOP/s: train.peak_tflops when set, else the table for a known GPU,
    else the measured matmul rate of this device in the training dtype (CPU, unknown GPUs)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type == "cuda":
        known = table_peak_flops(torch.cuda.get_device_name(device), precision)
        if known is not None:
            return known
    # fp16 matmuls on a CPU are an emulation no recipe trains with: fp32 there
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16 if device.type == "cuda" else torch.float32}.get(
        precision, torch.float32)
    return measured_matmul_flops(device.type, dtype, device.index)

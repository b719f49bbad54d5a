"""Benchmark: attention-transfer loss, forward + backward, fused Triton kernel vs the torch paths.

Methods
  fused     ernie_tiny_ds.kernels.attention_transfer_triton (Triton; CUDA only, the CPU interpreter is not timed)
  eager     losses.attention_transfer_loss without chunking (materialises every [B, H, L, L] map)
  chunked   the same with query_chunk=C (maps of [B, H, C, L] at a time)
  torch     kernels.attention_transfer_torch: the torch path training uses off CUDA (closed-form
            backward, one saved gradient map); torch-chunked: the same with query_chunk=C
  compiled  torch.compile of the eager reference (on CUDA by default; on CPU only with --compile)

Each (method, L) runs in its own subprocess so that memory figures do not leak between cases.
Time: median (and min) of fwd+bwd calls after the memory call: at least --repeats calls and,
for short cases, as many as fill 1 s (at most 100).
Peak extra memory of one fwd+bwd call (inputs already allocated; the returned gradients,
equal for every method, are included):
  CUDA  torch.cuda.max_memory_allocated() during the call minus the allocation before it.
  CPU   "tensor": peak of live torch CPU allocations during the call, from the running sum of
        torch.profiler's memory events (exact for torch tensors, blind to anything else);
        "RSS": the process's peak resident set during the call (VmHWM, reset through
        /proc/self/clear_refs just before) minus its resident set before it. RSS also counts
        glibc keeping freed blocks and fragmentation, so it can exceed the tensor peak a lot.

  python bench/attention_kernels.py                       # CUDA if present, else CPU with a small batch
  python bench/attention_kernels.py --device cpu --batch 1 --lengths 128 512 2048
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("eager", "chunked", "torch", "torch-chunked", "compiled", "fused")  # eager first: the ratios refer to it


# --------------------------------------------------------------------------- one case (child process)
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _loss_fn(method: str, kind: str, chunk: int):
    from ernie_tiny_ds import kernels, losses
    if method == "fused":
        return lambda *a: kernels.attention_transfer(*a, kind=kind)
    if method == "eager":
        return lambda *a: losses.attention_transfer_loss(*a, kind=kind)
    if method == "chunked":
        return lambda *a: losses.attention_transfer_loss(*a, kind=kind, query_chunk=chunk)
    if method in ("torch", "torch-chunked"):
        from ernie_tiny_ds.kernels.attention_transfer_torch import attention_transfer_torch
        query_chunk = chunk if method == "torch-chunked" else None
        return lambda *a: attention_transfer_torch(*a, kind=kind, query_chunk=query_chunk)
    if method == "compiled":
        compiled = torch.compile(losses.attention_transfer_loss, dynamic=False)
        return lambda *a: compiled(*a, kind=kind)
    raise ValueError(method)


def _inputs(batch, heads, length, d_s, d_t, dtype, device):
    def make(d, grad):
        return (torch.randn(batch, heads, length, d, device=device, dtype=dtype).requires_grad_(grad),
                torch.randn(batch, heads, length, d, device=device, dtype=dtype).requires_grad_(grad))
    q_s, k_s = make(d_s, True)
    q_t, k_t = make(d_t, False)
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    mask[batch // 2:, length - length // 4:] = 0  # padded tail on half of the batch
    return q_s, k_s, q_t, k_t, mask


def run_case(args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    fn = _loss_fn(args.method, args.kind, args.chunk)

    def step(inputs):
        for x in inputs[:2]:
            x.grad = None
        fn(*inputs).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    # warm-up on a tiny problem (library initialisation, compilation caches for the kernel code)
    if args.method != "compiled":
        step(_inputs(1, 2, 16, args.d_student, args.d_teacher, dtype, device))
    inputs = _inputs(args.batch, args.heads, args.length, args.d_student, args.d_teacher, dtype, device)
    if device.type == "cuda":
        if args.method == "compiled":
            step(inputs)  # compile outside the measurement
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(inputs)
        peak_extra = torch.cuda.max_memory_allocated() - base
    else:
        if args.method == "compiled":
            step(inputs)
        base = _rss_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set (VmHWM) to the current one
        step(inputs)
        rss_extra = (_rss_kib("VmHWM") - base) * 1024
        peak_extra = _profiled_tensor_peak(step, inputs)
    times: list[float] = []
    # at least --repeats calls and 1 s of them (short cases get more samples on a shared machine)
    while len(times) < args.repeats or (sum(times) < 1.0 and len(times) < 100):
        start = time.perf_counter()
        step(inputs)
        times.append(time.perf_counter() - start)
    result = {"ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "calls": len(times),
              "peak_extra_bytes": peak_extra}
    if device.type == "cpu":
        result["rss_extra_bytes"] = rss_extra
    return result


def _profiled_tensor_peak(step, inputs) -> int:
    """Peak bytes of torch CPU tensors allocated (and not yet freed) during one step."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step(inputs)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:  # allocations are positive, frees negative
        live += nbytes
        peak = max(peak, live)
    return peak


# --------------------------------------------------------------------------- driver
def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} ({platform.node()})"
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores visible, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--batch", type=int, default=None, help="default 32 on CUDA, 1 on CPU")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--d-teacher", type=int, default=64)
    p.add_argument("--d-student", type=int, default=26)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--kind", default="kl", choices=("kl", "mse"))
    p.add_argument("--chunk", type=int, default=128, help="query_chunk of the chunked torch path")
    p.add_argument("--repeats", type=int, default=None, help="default 10 on CUDA, 3 on CPU")
    p.add_argument("--compile", action="store_true", help="also time torch.compile on CPU (slow to compile)")
    p.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # child mode
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.method:
        print(json.dumps(run_case(args)))
        return

    cuda = args.device == "cuda"
    args.batch = args.batch or (32 if cuda else 1)
    args.repeats = args.repeats or (10 if cuda else 3)
    methods = [m for m in METHODS if (cuda or m not in ("fused", "compiled")) or (m == "compiled" and args.compile)]
    passthrough = ["--device", args.device, "--batch", str(args.batch), "--heads", str(args.heads),
                   "--d-teacher", str(args.d_teacher), "--d-student", str(args.d_student), "--dtype", args.dtype,
                   "--kind", args.kind, "--chunk", str(args.chunk), "--repeats", str(args.repeats)]
    print(f"machine: {machine(args.device)}; torch {torch.__version__}")
    print(f"command: python bench/{Path(__file__).name} {' '.join(sys.argv[1:])}")
    print(f"shapes: B={args.batch}, H={args.heads}, d_t={args.d_teacher}, d_s={args.d_student}, {args.dtype}, "
          f"kind={args.kind}, chunk={args.chunk}, >= {args.repeats} timed calls per case\n")
    mem = "peak extra MiB" if cuda else "peak extra MiB (tensor)"
    rss = "" if cuda else " peak extra MiB (RSS) |"
    print(f"| L | method | fwd+bwd ms median (min) | {mem} | speed-up vs eager | memory saving vs eager |{rss}")
    print("|---|---|---|---|---|---|" + ("" if cuda else "---|"))
    for length in args.lengths:
        results = {}
        for method in methods:
            cmd = [sys.executable, __file__, *passthrough, "--method", method, "--length", str(length)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                results[method] = None
                reason = (out.stderr.strip().splitlines() or ["no output"])[-1][:80]
                print(f"| {length} | {method} | failed: {reason} | | | |" + ("" if cuda else " |"), flush=True)
                continue
            results[method] = r = json.loads(out.stdout.strip().splitlines()[-1])
            eager = results.get("eager")  # ratios are eager / method: > 1 means better than eager
            ratio_t = f"{eager['ms'] / r['ms']:.2f}x" if eager else "n/a"
            ratio_m = f"{eager['peak_extra_bytes'] / max(r['peak_extra_bytes'], 1):.1f}x" if eager else "n/a"
            rss_cell = "" if cuda else f" {r['rss_extra_bytes'] / 2**20:.1f} |"
            print(f"| {length} | {method} | {r['ms']:.1f} ({r['min_ms']:.1f}) | "
                  f"{r['peak_extra_bytes'] / 2**20:.1f} | {ratio_t} | {ratio_m} |{rss_cell}", flush=True)


if __name__ == "__main__":
    main()

"""Inference speed of an encoder: batch-1 latency and batch-32 throughput, for teacher-vs-student reports.

Both numbers are medians over several timed repetitions after warm-up runs, in eval mode under
torch.no_grad, on fixed random token ids of a fixed length (a dense encoder's cost does not
depend on which tokens it reads). Compare two models only under the same thread count and device:
`compare_inference` measures both under one setting, their repetitions taking turns, and reports
speedup = teacher / student latency.
"""
from __future__ import annotations

import os
import statistics
import time
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from ..distill.models import count_parameters
from ..runtime.export import load_exported

THROUGHPUT_BATCH = 32


@contextmanager
def _threads(count: int | None) -> Iterator[int]:
    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _load(model: str | os.PathLike | nn.Module) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    return load_exported(model)


def _inputs(config, batch: int, seq_len: int, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=generator)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, device=device),
            "token_type_ids": torch.zeros_like(ids, device=device)}


def _check_settings(module: nn.Module, seq_len: int, repeats: int, warmup: int) -> None:
    if repeats < 1 or warmup < 0 or seq_len < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0 and seq_len >= 1 (got {repeats}, {warmup}, {seq_len})")
    if seq_len > module.config.max_position_embeddings:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_position_embeddings "
                         f"({module.config.max_position_embeddings})")


def _alternating_medians(modules: list[nn.Module], batch: int, seq_len: int, device: torch.device, seed: int,
                         warmup: int, repeats: int) -> list[float]:
    """Median seconds per forward of each module. Repetitions take turns (A, B, A, B, ...), so a slow
    spell of a shared machine falls on every model alike instead of on whichever ran during it."""
    inputs = [_inputs(m.config, batch, seq_len, device, seed) for m in modules]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        for module, x in zip(modules, inputs):
            module(**x)
    sync()
    times: list[list[float]] = [[] for _ in modules]
    for _ in range(repeats):
        for i, (module, x) in enumerate(zip(modules, inputs)):
            start = time.perf_counter()
            module(**x)
            sync()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def timed_in_turns(modules: list, seq_len: int, device: torch.device, seed: int, warmup: int,
                   repeats: int) -> list[dict]:
    """Per module {latency_ms_batch1, latency_ms_batch32, throughput_batch32 (sequences/s)}: medians,
    all modules taking turns at each batch size (callers set threads and no_grad)."""
    latency = _alternating_medians(modules, 1, seq_len, device, seed, warmup, repeats)
    batch = _alternating_medians(modules, THROUGHPUT_BATCH, seq_len, device, seed, warmup, repeats)
    return [{"latency_ms_batch1": lat * 1000.0, "latency_ms_batch32": b * 1000.0,
             "throughput_batch32": THROUGHPUT_BATCH / b} for lat, b in zip(latency, batch)]


def measure_models(models: list, seq_len: int = 128, repeats: int = 10, warmup: int = 3, threads: int | None = None,
                   device: str | torch.device = "cpu", seed: int = 0) -> list[dict]:
    """Per model {latency_ms_batch1, latency_ms_batch32, throughput_batch32 (sequences/s), params, seq_len,
    threads, repeats},
    all measured in turns under one thread count and device."""
    modules = [_load(m) for m in models]
    for module in modules:
        _check_settings(module, seq_len, repeats, warmup)
    device = torch.device(device)
    modes = [m.training for m in modules]
    for module in modules:
        module.eval().to(device)
    try:
        with _threads(threads) as used, torch.no_grad():
            timings = timed_in_turns(modules, seq_len, device, seed, warmup, repeats)
    finally:
        for module, mode in zip(modules, modes):
            module.train(mode)
    return [{**timing, "params": count_parameters(m), "seq_len": seq_len, "threads": used, "repeats": repeats}
            for m, timing in zip(modules, timings)]


def measure_inference(model: str | os.PathLike | nn.Module, **settings) -> dict:
    """One model: {latency_ms_batch1, throughput_batch32, params, seq_len, threads, repeats}."""
    return measure_models([model], **settings)[0]


def compare_inference(teacher: str | os.PathLike | nn.Module, student: str | os.PathLike | nn.Module,
                      **settings) -> dict:
    """Both models measured in turns under the same settings (threads default: the current count, shared)."""
    settings.setdefault("threads", torch.get_num_threads())
    t, s = measure_models([teacher, student], **settings)
    return {"teacher": t, "student": s,
            "speedup_latency": t["latency_ms_batch1"] / s["latency_ms_batch1"],
            "speedup_throughput": s["throughput_batch32"] / t["throughput_batch32"],
            "compression": t["params"] / s["params"]}

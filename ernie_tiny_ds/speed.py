"""Inference speed of an encoder: batch-1 latency and batch-32 throughput, for teacher-vs-student reports.

Both numbers are medians over several timed repetitions after warm-up runs, in eval mode under
torch.no_grad, on fixed random token ids of a fixed length (a dense encoder's cost does not
depend on which tokens it reads). Compare two models only under the same thread count and device:
`compare_inference` measures both under one setting and reports speedup = teacher / student latency.
"""
from __future__ import annotations

import os
import statistics
import time
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

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
    from .export import load_exported
    return load_exported(model)


def _inputs(config, batch: int, seq_len: int, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=generator)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids, device=device),
            "token_type_ids": torch.zeros_like(ids, device=device)}


def _median_seconds(model: nn.Module, inputs: dict, warmup: int, repeats: int) -> float:
    sync = torch.cuda.synchronize if inputs["input_ids"].is_cuda else (lambda: None)
    for _ in range(warmup):
        model(**inputs)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(**inputs)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_inference(model: str | os.PathLike | nn.Module, seq_len: int = 128, repeats: int = 10, warmup: int = 3,
                      threads: int | None = None, device: str | torch.device = "cpu", seed: int = 0) -> dict:
    """{latency_ms_batch1, throughput_batch32 (sequences/s), params, seq_len, threads, repeats}."""
    if repeats < 1 or warmup < 0 or seq_len < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0 and seq_len >= 1 (got {repeats}, {warmup}, {seq_len})")
    module = _load(model)
    config = module.config
    if seq_len > config.max_position_embeddings:
        raise ValueError(f"seq_len {seq_len} exceeds the model's max_position_embeddings "
                         f"({config.max_position_embeddings})")
    device = torch.device(device)
    was_training = module.training
    module.eval().to(device)
    from .models import count_parameters
    try:
        with _threads(threads) as used, torch.no_grad():
            latency = _median_seconds(module, _inputs(config, 1, seq_len, device, seed), warmup, repeats)
            batch = _median_seconds(module, _inputs(config, THROUGHPUT_BATCH, seq_len, device, seed), warmup,
                                    repeats)
    finally:
        module.train(was_training)
    return {"latency_ms_batch1": latency * 1000.0, "throughput_batch32": THROUGHPUT_BATCH / batch,
            "params": count_parameters(module), "seq_len": seq_len, "threads": used, "repeats": repeats}


def compare_inference(teacher: str | os.PathLike | nn.Module, student: str | os.PathLike | nn.Module,
                      **settings) -> dict:
    """Both models measured under the same settings (threads default: the current count, shared)."""
    settings.setdefault("threads", torch.get_num_threads())
    t = measure_inference(teacher, **settings)
    s = measure_inference(student, **settings)
    return {"teacher": t, "student": s,
            "speedup_latency": t["latency_ms_batch1"] / s["latency_ms_batch1"],
            "speedup_throughput": s["throughput_batch32"] / t["throughput_batch32"],
            "compression": t["params"] / s["params"]}

"""CPU-seconds of measuring task lengths (data/tasks.token_lengths, run by every rank when it builds a task
loader): the batched tokenizer call with full encodings, as before, against the count of each distinct text
once with the truncation worked out (as now); both must give the same lengths. The bundled tasks' train
splits at max_seq_len 64, then 50 k distinct pairs (coherence texts with a number appended) at 128.
The best of 3 runs each, time.process_time of this single-threaded process.

    OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 python bench/task_lengths.py
"""
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from teacher_precision import default_teacher  # noqa: E402

from ernie_tiny_ds.config import TaskConfig  # noqa: E402
from ernie_tiny_ds.data import tasks  # noqa: E402


def old(examples, tokenizer, max_seq_len: int) -> np.ndarray:
    """token_lengths as it was: the tokenizer's batched call, every encoding built."""
    lengths = np.zeros(len(examples), dtype=np.int64)
    for start in range(0, len(examples), 4096):
        part = examples[start:start + 4096]
        ids = tasks._tokenize(part, tokenizer, max_seq_len, return_token_type_ids=False)["input_ids"]
        lengths[start:start + len(part)] = [len(row) for row in ids]
    return lengths


def best_cpu_s(measure, *args) -> tuple[float, np.ndarray]:
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        lengths = measure(*args)
        best = min(best, time.process_time() - start)
    return best, lengths


def compare(what: str, examples, tokenizer, max_seq_len: int) -> None:
    (before, a), (after, b) = best_cpu_s(old, examples, tokenizer, max_seq_len), \
        best_cpu_s(tasks.token_lengths, examples, tokenizer, max_seq_len)
    print(f"{what}: {len(examples)} rows of {a.mean():.1f} tokens  before {before:.3f} CPU-s  after {after:.3f} CPU-s"
          f"  same lengths: {bool((a == b).all())}")


def main() -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(default_teacher())
    for name in ("sentiment", "pair", "similarity", "coherence"):
        compare(name, tasks.load_task(TaskConfig(name=name, max_seq_len=64)).train, tokenizer, 64)
    base = tasks.load_task(TaskConfig(name="coherence", max_seq_len=128)).train
    distinct = [dataclasses.replace(base[i % len(base)], texts=tuple(f"{t} {i}" for t in base[i % len(base)].texts))
                for i in range(50_000)]
    compare("50 k distinct coherence pairs, L=128", distinct, tokenizer, 128)


if __name__ == "__main__":
    main()

"""Loader benchmark: raw tokenizer vs streaming loader vs shard reader throughput, and peak RSS by corpus size.

    python bench/loader.py [--work /tmp/ernie-tiny-bench] [--sample-mb 8] [--sizes-mb 100 1000 | --sizes-mb]

All figures use the bundled WordPiece tokenizer on documents made of 2-6 lines of the bundled corpus.
  raw          tokenizer(batch of 256 documents), content tokens per CPU-second (the issue's baseline),
               and the backend's encode_batch_fast for reference
  streaming    one in-process consumer (= one worker) over the same sample file, content tokens/s
  shards       `preprocess` of the same sample, then ShardLoader batches, content tokens/s
  peak RSS     a child process per corpus size: rank 0 of 64 ranks over ONE file, so it reads every line
               of the whole file and tokenizes every 64th document, until its epoch ends
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BATCH, SEQ = 32, 128


def bundled_lines() -> list[str]:
    from ernie_tiny_ds.assets import DEFAULT_CORPUS_GLOB
    return [line.strip() for f in sorted(glob.glob(DEFAULT_CORPUS_GLOB)) for line in open(f, encoding="utf-8")
            if line.strip()]


def write_corpus(path: Path, megabytes: int, lines: list[str]) -> Path:
    """`megabytes` of documents of 2-6 bundled lines each (paragraph-sized: most fill more than one
    128-token sequence), one document per line; kept when the file already has that size."""
    target = megabytes * 1_000_000
    if path.exists() and path.stat().st_size >= target:
        return path
    rng = random.Random(megabytes)
    lines = list(lines)  # shuffled below: the caller's list (reused for every corpus) stays as given
    with open(path, "w", encoding="utf-8") as out:
        written = 0
        while written < target:
            rng.shuffle(lines)
            docs, at = [], 0
            while at < len(lines):
                size = rng.randint(2, 6)
                docs.append(" ".join(lines[at:at + size]))
                at += size
            block = "\n".join(docs) + "\n"
            out.write(block)
            written += len(block.encode())
    return path


def tokenizer():
    from ernie_tiny_ds.assets import DEFAULT_TOKENIZER
    from ernie_tiny_ds.data.tokenizer import load_tokenizer
    return load_tokenizer(str(DEFAULT_TOKENIZER))


class Clock:
    """Wall and CPU seconds of this process: the CPU figure is what a core delivers on a shared machine."""

    def __enter__(self) -> "Clock":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def raw_rates(tok, lines: list[str]) -> tuple[float, float]:
    """Content tokens per CPU-second: tokenizer(batch), and the backend's encode_batch_fast."""
    tokens = 0
    with Clock() as raw:
        for i in range(0, len(lines), 256):
            tokens += sum(map(len, tok(lines[i:i + 256], add_special_tokens=False)["input_ids"]))
    backend = tok.backend_tokenizer
    with Clock() as fast:
        for i in range(0, len(lines), 256):
            backend.encode_batch_fast(lines[i:i + 256], add_special_tokens=False)
    return tokens / raw.cpu, tokens / fast.cpu


def content_tokens(batch) -> int:
    return int(batch["attention_mask"].sum()) - 2 * batch["attention_mask"].shape[0]


def loader_rate(it, batches: int) -> tuple[float, float, float]:
    """Over `batches` batches of iterator `it`: (content tokens per CPU-second of this process,
    per wall second, fraction of positions that are padding)."""
    tokens = 0
    with Clock() as clock:
        for _ in range(batches):
            tokens += content_tokens(next(it))
    return tokens / clock.cpu, tokens / clock.wall, 1 - (tokens + 2 * BATCH * batches) / (BATCH * SEQ * batches)


def started(loader):
    it = iter(loader)
    next(it)  # opening files, first window, worker start-up
    return it


def child_rss(corpus: Path) -> None:
    """Child mode: stream one whole epoch as rank 0 of 64, print JSON with ru_maxrss."""
    import resource

    from ernie_tiny_ds.config import DataConfig
    from ernie_tiny_ds.data.corpus import build_general_loader
    loader = build_general_loader(DataConfig(corpus=str(corpus), max_seq_len=SEQ), tokenizer(), BATCH, 0, 64, 0)
    start, batches = time.perf_counter(), 0
    for _ in loader:
        batches += 1
        if loader.state_dict()["streams"][0]["window_start"]["epoch"]:  # the batch reached epoch 1
            break
    print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "batches": batches,
                      "seconds": time.perf_counter() - start}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/ernie-tiny-bench")
    parser.add_argument("--sample-mb", type=int, default=8)
    parser.add_argument("--sizes-mb", type=int, nargs="*", default=[100, 1000],
                        help="corpus sizes for the peak-RSS rows (none: throughput rows only)")
    parser.add_argument("--child-rss", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_rss:
        return child_rss(Path(args.child_rss))

    from ernie_tiny_ds.config import DataConfig
    from ernie_tiny_ds.data.corpus import build_general_loader
    from ernie_tiny_ds.data.preprocess import preprocess
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    lines = bundled_lines()
    sample = write_corpus(work / f"sample-{args.sample_mb}mb.txt", args.sample_mb, lines)
    sample_lines = [l.strip() for l in open(sample, encoding="utf-8") if l.strip()]
    tok = tokenizer()
    print(f"machine: {os.cpu_count()} CPU cores; sample {sample.stat().st_size / 1e6:.1f} MB, "
          f"{len(sample_lines)} documents; batch {BATCH} x {SEQ}", flush=True)

    # raw and streaming measured in alternating rounds (median of 3): the shared cores' speed drifts
    cfg = DataConfig(corpus=str(sample), max_seq_len=SEQ)
    stream_it, rounds = started(build_general_loader(cfg, tok, BATCH, 0, 1, 0)), []
    for _ in range(3):
        raw, fast = raw_rates(tok, sample_lines)
        rate, _, pad = loader_rate(stream_it, 200)
        rounds.append((rate / raw, raw, fast, rate))
    ratio, raw, fast, rate = sorted(rounds)[1]
    stream_it.close()
    print("rates are content tokens per CPU-second of the measuring process (wall-clock where marked)")
    print(f"raw tokenizer(batch)            {raw / 1e3:9.0f} K tokens/s")
    print(f"backend encode_batch_fast       {fast / 1e3:9.0f} K tokens/s")
    print(f"streaming loader, 1 worker      {rate / 1e3:9.0f} K tokens/s  = {ratio:.2f} x raw, median of 3 rounds "
          f"(all: {', '.join(f'{r[0]:.2f}' for r in rounds)}; {pad:.0%} padding)")
    workers_it = started(build_general_loader(dataclasses.replace(cfg, num_workers=2), tok, BATCH, 0, 1, 0))
    _, wall, _ = loader_rate(workers_it, 300)
    workers_it.close()
    print(f"streaming loader, 2 workers     {wall / 1e3:9.0f} K tokens/s  wall-clock, torch DataLoader processes")

    shards = work / f"shards-{args.sample_mb}mb"
    with Clock() as clock:
        meta = preprocess(cfg, tok, "bundled", shards, workers=2, overwrite=True, progress=False)
    print(f"preprocess --workers 2          {meta['tokens'] / clock.wall / 1e3:9.0f} K tokens/s  wall-clock "
          f"({meta['documents']} documents, {meta['tokens']} tokens, {meta['sequences']} sequences)")
    shard_cfg = dataclasses.replace(cfg, source="shards", corpus=str(shards))
    shard_batches = 3 * meta["sequences"] // BATCH  # three epochs
    rate, _, pad = loader_rate(started(build_general_loader(shard_cfg, tok, BATCH, 0, 1, 0)), shard_batches)
    print(f"shard reader, 1 process         {rate / 1e6:9.1f} M tokens/s "
          f"({shard_batches} batches, {pad:.0%} padding)", flush=True)

    for megabytes in args.sizes_mb:
        corpus = write_corpus(work / f"corpus-{megabytes}mb.txt", megabytes, lines)
        done = subprocess.run([sys.executable, __file__, "--child-rss", str(corpus)], capture_output=True, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        if done.returncode:
            raise SystemExit(done.stderr)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"peak RSS, {megabytes:5d} MB corpus     {result['maxrss_mb']:9.0f} MB  (whole file streamed in "
              f"{result['seconds']:.0f} s, {result['batches']} batches as rank 0 of 64)", flush=True)


if __name__ == "__main__":
    main()

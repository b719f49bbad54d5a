"""`ernie-tiny-ds preprocess`: tokenize and pack a corpus once into memory-mapped token shards.

Each of --workers processes reads its share of the corpus (the loader's sharding: whole files, or
every W-th document) and writes one shard; packing is the streaming loader's, so both sources train
on the same sequences (--packing full: the same filling across documents, one stream per worker
instead of one per shuffle window, so only each shard's last sequence is short). Everything is
written into a hidden temporary folder that is renamed to --output only once meta.json is in it:
a killed run never leaves a folder that looks complete.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue as queue_module
import shutil
import sys
import traceback
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from ..config import DataConfig
from ..errors import DataError
from ..files import replace_dir, temp_dir_beside
from ..outputs import claim_output, write_marker
from .indexed import FORMAT_VERSION, META, ShardWriter, token_dtype, tokenizer_identity
from .packing import FullPacker, TokenEncoder, pack_pieces
from .sharding import Consumer
from .sources import ReadStats, corpus_sources
from .stream import Position, next_group, owned_pieces
from .tokenizer import load_tokenizer

PREPROCESSED = "preprocessed_corpus"  # the marker kind of a shard folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="file, folder or glob of the corpus (or a dataset with "
                                                       "--format datasets)")
    parser.add_argument("--tokenizer", required=True, help="folder of a Hugging Face fast tokenizer")
    parser.add_argument("--output", required=True, help="folder to create for the shards")
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--packing", default=DataConfig.packing, choices=("document", "full"),
                        help="document: sequences never mix documents; full: fill them across documents")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (one shard each)")
    parser.add_argument("--format", default="auto", choices=("auto", "text", "jsonl", "parquet", "datasets"))
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--document-separator", default="line", choices=("line", "blank_line"))
    parser.add_argument("--on-binary-file", default="error", choices=("error", "skip"))
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --output when it is an earlier preprocessed corpus (nothing else is "
                             "ever replaced)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _worker(sources, cfg, tokenizer, worker: int, workers: int, folder: Path, dtype: str, queue) -> None:
    """One process: its share of the corpus -> shard-<worker>; reports progress and totals on `queue`."""
    try:
        stats = ReadStats()
        writer = ShardWriter(folder, worker, dtype)
        encoder = TokenEncoder(tokenizer)
        documents = content = 0
        pieces = owned_pieces(sources, cfg, Consumer(0, 1, worker, workers), 0, Position(), stats)
        full = FullPacker(encoder, cfg.max_seq_len) if cfg.packing == "full" else None
        sep = tokenizer.sep_token_id
        while group := next_group(pieces):
            started = sum(after.piece == 1 for _, after in group)  # documents whose first piece is here
            before = content
            texts = [text for text, _ in group]
            if full is not None:
                packed = [full.add(texts, [after.piece == 1 for _, after in group])]
            else:
                packed = pack_pieces(texts, encoder, cfg.max_seq_len)
            for sequences in packed:
                for seq in sequences:
                    writer.add(seq)
                    content += len(seq) - 1 - seq[1:].count(sep)  # not [CLS], [SEP]s (between documents too)
            documents += started
            queue.put(("progress", started, content - before))
        for seq in full.flush() if full is not None else []:
            writer.add(seq)
            content += len(seq) - 1 - seq[1:].count(sep)
        shard = writer.close()
        queue.put(("done", worker, {"shard": shard, "documents": documents, "tokens": content,
                                    "invalid_utf8": stats.invalid_utf8}))
    except DataError as exc:
        queue.put(("error", worker, str(exc)))
    except BaseException:
        queue.put(("error", worker, f"worker {worker} failed:\n{traceback.format_exc()}"))


def _run_workers(sources, cfg, tokenizer, workers: int, folder: Path, dtype: str, progress: bool) -> list[dict]:
    context = multiprocessing.get_context("fork")  # the tokenizer and config are inherited, not pickled
    queue = context.Queue()
    procs = [context.Process(target=_worker, args=(sources, cfg, tokenizer, w, workers, folder, dtype, queue),
                             daemon=True) for w in range(workers)]
    for p in procs:
        p.start()
    results: dict[int, dict] = {}
    tokens = 0
    bar = tqdm(unit="doc", desc="preprocess", disable=not progress, file=sys.stderr)
    try:
        while len(results) < workers:
            try:
                message = queue.get(timeout=1.0)
            except queue_module.Empty:  # check that no worker died without a word
                dead = [w for w, p in enumerate(procs) if p.exitcode not in (None, 0) and w not in results]
                if dead:
                    raise DataError(f"preprocess worker {dead[0]} died (exit code {procs[dead[0]].exitcode})") from None
                continue
            if message[0] == "progress":
                tokens += message[2]
                bar.update(message[1])
                bar.set_postfix(tokens=tokens, refresh=False)
            elif message[0] == "error":
                raise DataError(message[2])
            else:
                results[message[1]] = message[2]
    finally:
        bar.close()
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
    return [results[w] for w in range(workers)]


def _remove_stale_temps(output: Path) -> None:
    """Temporary folders of killed runs (their process is gone) for the same output."""
    prefix = f".{output.name}.tmp-"
    for temp in output.parent.glob(f"{prefix}*"):
        if temp.is_symlink() or not temp.is_dir():
            continue  # not a folder this tool made
        try:
            os.kill(int(temp.name[len(prefix):].split("-")[0]), 0)  # .NAME.tmp-PID-RANDOM
        except ProcessLookupError:
            shutil.rmtree(temp, ignore_errors=True)
        except (ValueError, PermissionError):
            continue  # not ours, or a live process of another user


def preprocess(cfg: DataConfig, tokenizer, tokenizer_path: str, output: Path, workers: int,
               overwrite: bool = False, progress: bool = True) -> dict:
    """Write the shard folder `output`; return its meta."""
    if workers < 1:
        raise DataError(f"--workers must be at least 1, got {workers}")
    if not 8 <= cfg.max_seq_len <= 8192:
        raise DataError(f"--max-seq-len must be in 8..8192, got {cfg.max_seq_len}")
    claim_output(output, PREPROCESSED, "--output", {"--input": cfg.corpus, "--tokenizer": tokenizer_path}, overwrite)
    stats = ReadStats()
    sources = corpus_sources(cfg, stats)
    output.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(output)
    # created exclusively under a random name (a planted folder or symlink is never written through);
    # the pid in it lets a later run tell a killed run's leftovers from a live one's
    temp = temp_dir_beside(output, prefix=f".{output.name}.tmp-{os.getpid()}-")
    try:
        dtype = token_dtype(len(tokenizer))
        results = _run_workers(sources, cfg, tokenizer, workers, temp, dtype, progress)
        invalid: dict = {}
        for r in results:
            invalid.update(r["invalid_utf8"])
        meta = {
            "format_version": FORMAT_VERSION,
            "documents": sum(r["documents"] for r in results),
            "tokens": sum(r["tokens"] for r in results),
            "sequences": sum(r["shard"]["sequences"] for r in results),
            "max_seq_len": cfg.max_seq_len,
            "packing": cfg.packing,
            "dtype": dtype,
            "tokenizer": {"path": tokenizer_path, **tokenizer_identity(tokenizer)},
            "sources": sources,
            "skipped_binary_files": stats.skipped_binary,
            "invalid_utf8_lines": invalid,
            "shards": [r["shard"] for r in results],
        }
        (temp / META).write_text(json.dumps(meta, indent=2))
        write_marker(temp, PREPROCESSED)
        # --overwrite: the old folder goes aside (into an exclusive temp folder) first, so a crash keeps one
        replace_dir(temp, output)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return meta


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = replace(DataConfig(), corpus=args.input, format=args.format, text_field=args.text_field,
                  document_separator=args.document_separator, on_binary_file=args.on_binary_file,
                  max_seq_len=args.max_seq_len, packing=args.packing)
    tokenizer = load_tokenizer(args.tokenizer, key="--tokenizer")
    meta = preprocess(cfg, tokenizer, args.tokenizer, Path(args.output), args.workers, args.overwrite,
                      progress=not args.no_progress)
    skipped = f", {len(meta['skipped_binary_files'])} binary file(s) skipped" if meta["skipped_binary_files"] else ""
    bad = sum(meta["invalid_utf8_lines"].values())
    repaired = f", {bad} line(s) with invalid UTF-8 repaired" if bad else ""
    print(f"documents: {meta['documents']}  tokens: {meta['tokens']}  sequences: {meta['sequences']}  "
          f"shards: {len(meta['shards'])}{skipped}{repaired}  -> {args.output}", flush=True)
    return 0

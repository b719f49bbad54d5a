"""TinyBERT-style task-data augmentation: `ernie-tiny-ds augment --config RECIPE --output FILE`.

Every train example is written unchanged, then augment.copies copies of it in which each word (each
character of Chinese text) is, with probability augment.replace_prob, replaced by one of a masked
LM's augment.top_k candidates for it: the word is masked in its own sentence and the MLM ranks the
vocabulary. Labels and the other columns are kept; pair tasks augment both texts. The output has the
train file's format and columns, so task.augmented_train_file reads it like any task file.

Choices:
- A word the tokenizer splits into several pieces is masked as ONE [MASK] and replaced by a
  single-piece candidate (a whole word of the vocabulary, never a ## continuation).
- CJK characters are always units of one (as Chinese BERT vocabularies split them), so Chinese is
  augmented character by character even with a tokenizer that keeps words whole; a CJK character is
  only replaced by a CJK character, a word only by a word. Punctuation is never replaced.
- The masked LM: the teacher's (teacher.path) when its checkpoint has a trained MLM head, else
  augment.mlm_model. Candidates are computed once per word (cost: one MLM forward per word of the
  train file, whatever augment.copies is); the copies then only draw from them.
- Deterministic: each example draws from its own generator ([seed, example number]) and MLM scores
  are ranked on a 1e-3 grid (ties: the lower token id), so batch size and chunking do not change a byte.
- Resumable: examples are done in chunks, each written durably to OUTPUT.augment-parts/ and
  recorded in OUTPUT.augment-state.json; a re-run with the same settings skips the finished chunks.
  The output appears under its name only when complete (files.write_atomic).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import shutil
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForMaskedLM
from transformers.utils import logging as hf_logging

from ..config import Recipe, load_recipe, to_dict
from ..data.hub import resolve as resolve_hub
from ..data.tasks import FORMATS, _rows, load_task, resolve_task
from ..data.tokenizer import check_vocab_matches, load_tokenizer, recipe_tokenizer_path
from ..errors import ConfigError
from ..files import atomic_write_text, remove_stale_temps, write_atomic
from ..outputs import claim_file, exclusive, recipe_inputs

CHUNK_EXAMPLES = 500   # examples per resumable chunk
SCORE_GRID = 1000.0    # MLM log-probabilities are ranked rounded to 1/SCORE_GRID (batch-size-proof)
_WORD_START = ("\u2581", "\u0120")  # SentencePiece / byte-level BPE word-start markers


def is_cjk(char: str) -> bool:
    code = ord(char)
    return (0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0x20000 <= code <= 0x2A6DF
            or 0x2A700 <= code <= 0x2CEAF or 0xF900 <= code <= 0xFAFF or 0x2F800 <= code <= 0x2FA1F)


def _is_word(text: str) -> bool:
    return any(unicodedata.category(c)[0] in "LN" for c in text)  # a letter or a digit: not punctuation


# --------------------------------------------------------------------------- the masked LM
@dataclass
class MaskedLM:
    model: torch.nn.Module
    tokenizer: object
    key: str                 # the recipe key it came from, for messages
    cjk: torch.Tensor        # [vocab] bool: one CJK character
    word: torch.Tensor       # [vocab] bool: a whole word without CJK
    surface: list[str]       # each id's text as it goes into a sentence ("" when not a candidate)


def _load_masked_lm(folder: str, key: str, trust_remote_code: bool) -> tuple[torch.nn.Module | None, list[str]]:
    """(model, the head weights the checkpoint lacks); a lacking head would be random: unusable."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report of a headless checkpoint is what we check below
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(folder, output_loading_info=True,
                                                           trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{key}: cannot load a masked LM from {folder}: {str(exc).splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, sorted(info.get("missing_keys") or [])


def _has_tokenizer(folder: str) -> bool:
    return any((Path(folder) / name).is_file() for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"))


def load_mlm(recipe: Recipe) -> MaskedLM:
    """The teacher's masked LM when teacher.path carries a trained MLM head, else augment.mlm_model."""
    teacher = recipe.teacher
    if teacher.path is not None:
        folder = resolve_hub(teacher.path, "teacher.path", teacher.revision)
        model, missing = _load_masked_lm(folder, "teacher.path", teacher.trust_remote_code)
        if not missing:
            tokenizer_dir = recipe_tokenizer_path(recipe, use_finetuned_teacher=False)
            return _prepared(model, load_tokenizer(tokenizer_dir), tokenizer_dir, "teacher.path")
        why = f"teacher.path ({teacher.path}) has no trained masked-LM head (missing {', '.join(missing[:3])}, ...)"
    else:
        why = "teacher.path is not set (a finetuned teacher or an inline teacher.config has no trained MLM head)"
    if recipe.augment.mlm_model is None:
        raise ConfigError(f"augment.mlm_model: not set, and {why}: name a masked LM with its head (a folder or "
                          f"Hub ID, e.g. augment.mlm_model=bert-base-uncased) that shares the task's language")
    folder = resolve_hub(recipe.augment.mlm_model, "augment.mlm_model")
    model, missing = _load_masked_lm(folder, "augment.mlm_model", teacher.trust_remote_code)
    if missing:
        raise ConfigError(f"augment.mlm_model: {recipe.augment.mlm_model} has no trained masked-LM head (missing "
                          f"{', '.join(missing[:3])}, ...)")
    tokenizer_dir = folder if _has_tokenizer(folder) else recipe_tokenizer_path(recipe, use_finetuned_teacher=False)
    return _prepared(model, load_tokenizer(tokenizer_dir, "augment.mlm_model"), tokenizer_dir, "augment.mlm_model")


def _prepared(model, tokenizer, tokenizer_dir: str, key: str) -> MaskedLM:
    check_vocab_matches(tokenizer, model.config, tokenizer_dir)
    if tokenizer.mask_token_id is None:
        raise ConfigError(f"{key}: the tokenizer in {tokenizer_dir} has no mask token")
    vocab = model.config.vocab_size
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    marked = any(t.startswith(_WORD_START) for t in tokens)  # SentencePiece/BPE: unmarked pieces continue a word
    special = set(tokenizer.all_special_ids)
    cjk, word, surface = torch.zeros(vocab, dtype=torch.bool), torch.zeros(vocab, dtype=torch.bool), [""] * vocab
    for i, token in enumerate(tokens):
        if i in special or token.startswith("##") or (marked and not token.startswith(_WORD_START)):
            continue
        text = token[1:] if marked else token
        if len(text) == 1 and is_cjk(text):
            cjk[i], surface[i] = True, text
        elif text.isalnum() and not any(is_cjk(c) for c in text):
            word[i], surface[i] = True, text
    model.eval()
    return MaskedLM(model.to(_device()), tokenizer, key, cjk, word, surface)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------- words and candidates
def word_spans(tokenizer, text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the replaceable units of `text`: the tokenizer's words, CJK
    characters one by one, punctuation left out."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    words: dict[int, list[int]] = {}
    for word, (start, end) in zip(enc.word_ids(), enc["offset_mapping"]):
        if word is not None and end > start:
            span = words.setdefault(word, [start, end])
            span[0], span[1] = min(span[0], start), max(span[1], end)
    spans = []
    for start, end in sorted(words.values()):
        run = start  # split out CJK characters; the text between them stays one unit
        for at in range(start, end):
            if is_cjk(text[at]):
                spans += [(run, at)] if at > run else []
                spans.append((at, at + 1))
                run = at + 1
        spans += [(run, end)] if end > run else []
    return [(s, e) for s, e in spans if _is_word(text[s:e])]


def candidates(mlm: MaskedLM, queries: list[tuple[str, str]], batch_size: int, top_k: int,
               max_seq_len: int) -> list[list[str]]:
    """For each (masked text, original word): up to top_k replacement surfaces, best first."""
    out: list[list[str]] = []
    tok = mlm.tokenizer
    for start in range(0, len(queries), batch_size):
        batch = queries[start:start + batch_size]
        enc = tok([text for text, _ in batch], truncation=True, max_length=max_seq_len, padding=True,
                  return_tensors="pt")
        with torch.inference_mode():
            logits = mlm.model(**{k: v.to(_device()) for k, v in enc.items()}).logits.float().cpu()
        for row, (_, original) in enumerate(batch):
            where = (enc["input_ids"][row] == tok.mask_token_id).nonzero()
            if len(where) == 0:  # the word lies beyond max_seq_len: left as it is
                out.append([])
                continue
            out.append(_ranked(mlm, logits[row, int(where[0])], original, top_k))
    return out


def _ranked(mlm: MaskedLM, logits: torch.Tensor, original: str, top_k: int) -> list[str]:
    allowed = mlm.cjk if len(original) == 1 and is_cjk(original) else mlm.word
    vocab = allowed.numel()
    scores = torch.round(torch.log_softmax(logits[:vocab].double(), dim=-1) * SCORE_GRID)
    ids = torch.arange(vocab, dtype=torch.float64)
    key = torch.where(allowed, scores * vocab + (vocab - 1 - ids), torch.tensor(-float("inf"), dtype=torch.float64))
    picked = torch.topk(key, min(top_k + 1, vocab)).indices.tolist()  # + 1: the word itself may be among them
    surfaces = [mlm.surface[i] for i in picked if allowed[i]]
    return [s for s in surfaces if s.casefold() != original.casefold()][:top_k]


def _cased_like(word: str, original: str) -> str:
    if len(original) > 1 and original.isupper():
        return word.upper()
    if original[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


# --------------------------------------------------------------------------- one chunk of examples
def augment_texts(mlm: MaskedLM, texts_per_example: list[tuple[str, ...]], first_number: int, recipe: Recipe,
                  seed: int, max_seq_len: int) -> list[list[tuple[str, ...]]]:
    """The augment.copies augmented text tuples of each example (example numbers from first_number)."""
    cfg = recipe.augment
    spans = [[word_spans(mlm.tokenizer, text) for text in texts] for texts in texts_per_example]
    queries, where = [], []
    for e, texts in enumerate(texts_per_example):
        for t, text in enumerate(texts):
            for s, (a, b) in enumerate(spans[e][t]):
                queries.append((text[:a] + mlm.tokenizer.mask_token + text[b:], text[a:b]))
                where.append((e, t, s))
    found = candidates(mlm, queries, cfg.batch_size, cfg.top_k, max_seq_len)
    options: dict[tuple[int, int, int], list[str]] = dict(zip(where, found))
    out = []
    for e, texts in enumerate(texts_per_example):
        rng = np.random.default_rng([seed, first_number + e])
        copies = []
        for _ in range(cfg.copies):
            copy = []
            for t, text in enumerate(texts):
                pieces, at = [], 0
                for s, (a, b) in enumerate(spans[e][t]):
                    replace, pick = rng.random() < cfg.replace_prob, rng.random()  # two draws, always
                    choices = options[(e, t, s)]
                    if replace and choices:
                        pieces += [text[at:a], _cased_like(choices[int(pick * len(choices))], text[a:b])]
                        at = b
                copy.append("".join(pieces) + text[at:])
            copies.append(tuple(copy))
        out.append(copies)
    return out


# --------------------------------------------------------------------------- the output file
class RowWriter:
    """Rows back in the train file's format: .tsv as GLUE (no quoting), .csv quoted, .jsonl objects."""

    def __init__(self, fmt: str, header: list[str] | None):
        self.fmt, self.header = fmt, header

    def head(self) -> str:
        if self.fmt == "jsonl" or self.header is None:
            return ""
        return self.line(dict(zip(self.header, self.header)))

    def line(self, row: dict) -> str:
        if self.fmt == "jsonl":
            return json.dumps(row, ensure_ascii=False) + "\n"
        values = [str(row[c]) for c in (self.header or sorted(row, key=int))]
        if self.fmt == "tsv":
            return "\t".join(values) + "\n"
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerow(values)
        return buffer.getvalue()


def _train_rows(task_cfg) -> tuple[list[dict], RowWriter]:
    """The raw rows of the task's train examples (the selection hold-out left out), and their writer."""
    task = load_task(task_cfg)
    cfg = resolve_task(task_cfg)
    path = Path(cfg.train_file)
    kept = {example.source for example in task.train}
    columns = [*cfg.text_columns, cfg.label_column]
    rows = [row for line, row in _rows(path, columns, cfg.header) if f"{path}:{line}" in kept]
    fmt = FORMATS[path.suffix.lower()]
    header = list(rows[0]) if cfg.header and fmt != "jsonl" else None
    return rows, RowWriter(fmt, header)


def _check_output(output: Path, task_cfg, recipe: Recipe) -> None:
    train = Path(task_cfg.train_file)
    claim_file(output, "--output", recipe_inputs(dataclasses.replace(recipe, task=task_cfg),
                                                 leave_out=("task.augmented_train_file",)))
    if FORMATS.get(output.suffix.lower()) != FORMATS[train.suffix.lower()]:
        raise ConfigError(f"--output: {output.name} must have the format of task.train_file ({train.name}): "
                          f"use a {train.suffix} name")


def _fingerprint(recipe: Recipe, seed: int, train: Path, count: int, chunk: int) -> str:
    """What decides the output's bytes (not batch_size): a state file from other settings is not resumed."""
    settings = {k: v for k, v in to_dict(recipe.augment).items() if k != "batch_size"}
    digest = hashlib.sha256(train.read_bytes()).hexdigest()
    values = {"augment": settings, "seed": seed, "train": digest, "examples": count, "chunk": chunk,
              "task": to_dict(recipe.task), "teacher": [recipe.teacher.path, recipe.teacher.revision],
              "tokenizer": recipe.data.tokenizer}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def augment_file(recipe: Recipe, output: str | Path, chunk_examples: int = CHUNK_EXAMPLES, after_chunk=None) -> Path:
    """Write the augmented train file to `output` (resuming an interrupted run); `after_chunk(done)`
    is called after each chunk is durable."""
    output = Path(output)
    if recipe.task.dataset is not None:
        raise ConfigError("task.dataset: augment reads task files; write the train split to a .tsv/.jsonl file "
                          "and set task.train_file")
    task_cfg = resolve_task(recipe.task)
    _check_output(output, task_cfg, recipe)
    # one job per OUTPUT: the lock covers its parts and state beside it, and what a killed run left there
    with exclusive(output.parent, output.name, "--output"):
        return _augment_into(recipe, output, task_cfg, chunk_examples, after_chunk)


def _augment_into(recipe: Recipe, output: Path, task_cfg, chunk_examples: int, after_chunk) -> Path:
    rows, writer = _train_rows(recipe.task)
    rows = rows[:recipe.augment.max_examples] if recipe.augment.max_examples else rows
    seed = recipe.train.seed if recipe.augment.seed is None else recipe.augment.seed
    output.parent.mkdir(parents=True, exist_ok=True)
    parts = output.with_name(output.name + ".augment-parts")
    state_file = output.with_name(output.name + ".augment-state.json")
    key = _fingerprint(recipe, seed, Path(task_cfg.train_file), len(rows), chunk_examples)
    done = _resume_point(state_file, parts, key)
    mlm = load_mlm(recipe) if done * chunk_examples < len(rows) else None
    total, started, start_count = len(rows), time.monotonic(), min(done * chunk_examples, len(rows))
    for first in range(done * chunk_examples, total, chunk_examples):
        chunk = rows[first:first + chunk_examples]
        texts = [tuple(str(row[c]) for c in task_cfg.text_columns) for row in chunk]
        copies = augment_texts(mlm, texts, first, recipe, seed, task_cfg.max_seq_len)
        lines = []
        for row, example_copies in zip(chunk, copies):
            lines.append(writer.line(row))
            for copy in example_copies:
                lines.append(writer.line({**row, **dict(zip(task_cfg.text_columns, copy))}))
        done += 1
        atomic_write_text(parts / f"part-{done - 1:06d}.txt", "".join(lines))
        atomic_write_text(state_file, json.dumps({"fingerprint": key, "chunks_done": done}) + "\n")
        finished = first + len(chunk)
        rate = (finished - start_count) / max(time.monotonic() - started, 1e-9)
        print(f"augment: {finished}/{total} examples ({rate:.1f} examples/s)", flush=True)
        if after_chunk is not None:
            after_chunk(done)
    _assemble(output, writer, parts, done)
    state_file.unlink(missing_ok=True)
    shutil.rmtree(parts, ignore_errors=True)
    print(f"augment: {total} examples + {total * recipe.augment.copies} copies -> {output}", flush=True)
    return output


def _resume_point(state_file: Path, parts: Path, key: str) -> int:
    """How many chunks an earlier run with the same settings finished (0: start afresh)."""
    if state_file.is_file():
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
        except ValueError:
            state = {}
        done = int(state.get("chunks_done", 0)) if state.get("fingerprint") == key else 0
        if done and all((parts / f"part-{i:06d}.txt").is_file() for i in range(done)):
            print(f"augment: resuming after {done} finished chunk(s) ({state_file})", flush=True)
            return done
        print(f"augment: {state_file} is from other settings or incomplete: starting afresh", flush=True)
    shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir(parents=True)
    return 0


def _assemble(output: Path, writer: RowWriter, parts: Path, chunks: int) -> None:
    remove_stale_temps(output)

    def write(handle) -> None:
        handle.write(writer.head().encode("utf-8"))
        for i in range(chunks):
            with open(parts / f"part-{i:06d}.txt", "rb") as part:
                shutil.copyfileobj(part, handle)

    write_atomic(output, write)


# --------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML recipe: its task's train file is augmented")
    parser.add_argument("--output", required=True, help="the augmented train file (same format as task.train_file)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides (augment.*, task.*)")


def run(args) -> int:
    augment_file(load_recipe(args.config, args.overrides), args.output)
    return 0

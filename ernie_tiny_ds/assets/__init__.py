"""Assets bundled with the package so the main job and the tests run offline.

  corpus/     a generated English general corpus (plain text, one document per line, 4 shards)
  tokenizer/  a lower-case WordPiece tokenizer trained by the project on that text (it covers the
              grammar's whole vocabulary, so it stops well below its 4096-entry cap)
  tasks/      three small generated tasks: sentiment (single sentence, 2 classes),
              pair (sentence pair, 3 classes), similarity (sentence pair, regression 0-5);
              and coherence (sentence pair, 3 classes), real Wikipedia sentences: does B follow A,
              come from A's article further away, or from another article?

The generated parts come from `python -m ernie_tiny_ds.assets.build_assets` (deterministic), the
coherence task from `python -m ernie_tiny_ds.assets.build_coherence` (its docstring says where the
text comes from).
"""
from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
DEFAULT_CORPUS_DIR = ASSETS_DIR / "corpus"
DEFAULT_CORPUS_GLOB = str(DEFAULT_CORPUS_DIR / "*.txt")
DEFAULT_TOKENIZER = ASSETS_DIR / "tokenizer"
TASKS_DIR = ASSETS_DIR / "tasks"
GENERATED_TASKS = ("sentiment", "pair", "similarity")
BUNDLED_TASKS = (*GENERATED_TASKS, "coherence")


def task_dir(name: str) -> Path:
    """Folder of a bundled task: train.tsv, dev.tsv and task.json (columns, labels, type)."""
    if name not in BUNDLED_TASKS:
        raise KeyError(f"{name!r} is not a bundled task; bundled: {', '.join(BUNDLED_TASKS)}")
    return TASKS_DIR / name

"""Runs that several tests start from, made once per test session: a process start-up costs more than
the steps it runs. A test gets a copy of its own, so what it damages or resumes is never another's."""
from __future__ import annotations

import shutil
from pathlib import Path

import yaml

STOPPED_STEPS, STOPPED_AT, STOPPED_SAVE_EVERY = 6, 2, 2
TWO_RANKS_STOPPED_AT = 4


def stage1_stopped_at_step_2(folder: Path, tokenizer: str, vocab_size: int) -> Path:
    """Stage 1 of tiny_recipe in one process (no launcher): 6 steps, a checkpoint every 2, stopped at
    step 2 (one checkpoint, step_00000002). Returns the run's folder (recipe.yaml, corpus/, out/)."""
    from distributed import run_cli, tiny_recipe

    recipe = tiny_recipe(folder, tokenizer, vocab_size,
                         train={"max_steps": STOPPED_STEPS, "save_every": STOPPED_SAVE_EVERY})
    proc = run_cli(["distill", "--config", str(recipe), "--stage", "general", f"train.stop_at_step={STOPPED_AT}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"stopped at step {STOPPED_AT} of {STOPPED_STEPS}" in proc.stdout + proc.stderr, proc.stdout[-3000:]
    return folder


def corpus_with(folder: Path, name: str, content: bytes) -> Path:
    """folder/odd_corpus: a real document beside the file `name` holding `content`."""
    corpus = folder / "odd_corpus"
    corpus.mkdir()
    (corpus / "good.txt").write_text("A real document about the river town. It has two sentences.\n" * 40)
    (corpus / name).write_bytes(content)
    return corpus


def stage1_on_two_ranks_stopped_at_step_4(folder: Path, tokenizer: str, vocab_size: int) -> Path:
    """Stage 1 of tiny_recipe on 2 ranks under torchrun: 6 steps, a checkpoint every 2 (3
    kept), stopped at step 4 (step_00000002 and step_00000004). Its corpus holds an empty file beside a
    real one, which the run must skip. Returns the run's folder (recipe.yaml, odd_corpus/, out/)."""
    from distributed import run_ranks, tiny_recipe

    corpus = corpus_with(folder, "empty.txt", b"")
    recipe = tiny_recipe(folder, tokenizer, vocab_size, data={"corpus": str(corpus)},
                         train={"max_steps": STOPPED_STEPS, "save_every": STOPPED_SAVE_EVERY, "keep_checkpoints": 3})
    proc = run_ranks(["distill", "--config", str(recipe), "--stage", "general",
                      f"train.stop_at_step={TWO_RANKS_STOPPED_AT}"])
    stopped = f"stopped at step {TWO_RANKS_STOPPED_AT} of {STOPPED_STEPS}"
    assert stopped in proc.stdout + proc.stderr, proc.stdout[-3000:]
    return folder


def copy_of_run(run: Path, dest: Path) -> Path:
    """`run`'s output folder copied to dest/out and its recipe to dest/recipe.yaml with output_dir moved
    there (output_dir is no part of a stage's fingerprint: a run folder may move). The corpus stays the
    shared run's: no command writes into a corpus. Returns the copied recipe's path."""
    shutil.copytree(run / "out", dest / "out", symlinks=True)
    values = yaml.safe_load((run / "recipe.yaml").read_text())
    values["output_dir"] = str(dest / "out")
    recipe = dest / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(values))
    return recipe

"""Rank-0-only work (the dev evaluation after finetuning, an export, the report) may take longer than
train.dist_timeout_s: the other ranks wait for it instead of timing out and blaming a rank that
is alive. Real ranks (torchrun)."""
import time

import pytest
import yaml
from distributed import run_ranks, tiny_teacher
from test_finetune import keyword_task

pytestmark = pytest.mark.slow


def test_a_dev_evaluation_longer_than_the_collective_timeout_does_not_end_the_job(tmp_path, tokenizer_dir,
                                                                                 vocab_size):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "out"),
        # a teacher and a dev split big enough that rank 0 scores it for well over dist_timeout_s
        "teacher": {"config": tiny_teacher(vocab_size, layers=4, hidden=128)},
        "data": {"tokenizer": tokenizer_dir},
        "task": keyword_task(tmp_path / "task", n_train=64, n_dev=4000),
        "finetune": {"epochs": 1, "micro_batch_size": 16},
        "train": {"dist_timeout_s": 5, "save_every": 1000},
    }))
    started = time.time()
    proc = run_ranks(["finetune-teacher", "--config", str(recipe)], check=False, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "left the job" not in out and "Traceback" not in out
    assert "finetuned teacher written to" in out
    assert (tmp_path / "out/teacher_finetuned/finetune_done.json").is_file()
    assert not (tmp_path / "out/teacher_finetuned.checkpoints").exists()
    assert time.time() - started > 5  # the job outlived the collective timeout

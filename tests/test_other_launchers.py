"""The launchers users of PyTorch and Hugging Face tools already have: torchrun and `accelerate launch`.

Neither is the deepspeed runner: torchrun sets LOCAL_WORLD_SIZE but not LOCAL_SIZE (DeepSpeed's CPU
shared-memory all-reduce reads it), and `accelerate launch --use_deepspeed` adds its own variables
(ACCELERATE_USE_DEEPSPEED, ...). Each runs the same 2-rank stage here; both must form one world of 2
and train the very same steps (same seed, same data order).
"""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from distributed import REPO, env, free_port, read_metrics, tiny_recipe

BIN = Path(sys.executable).parent


def _launch(kind: str, recipe: Path) -> subprocess.CompletedProcess:
    job = ["-m", "ernie_tiny_ds.cli", "distill", "--config", str(recipe), "--stage", "general"]
    if kind == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), *job]
    else:
        cmd = [str(BIN / "accelerate"), "launch", "--use_deepspeed", "--num_processes", "2", "--num_machines", "1",
               "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no", *job]
    return subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None or not shutil.which("accelerate", path=str(BIN)),
                    reason="accelerate is not installed (pip install '.[launchers]')")
def test_torchrun_and_accelerate_launch_train_one_world_of_two(tmp_path, tokenizer_dir, vocab_size):
    losses = {}
    for kind in ("torchrun", "accelerate"):
        recipe = tiny_recipe(tmp_path / kind, tokenizer_dir, vocab_size)
        proc = _launch(kind, recipe)
        text = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{kind}: exit {proc.returncode}\n{text[-5000:]}"
        assert "Traceback" not in text, text[-5000:]
        ranks = sorted(re.findall(r"\[rank (\d)\] pid \d+ General Distillation: ZeRO-1", text))
        assert ranks == ["0", "1"], f"{kind}: not one world of 2\n{text[-3000:]}"
        assert "General Distillation done: 6 steps" in text
        metrics = read_metrics(tmp_path / kind / "out" / "general" / "metrics.jsonl")
        assert [m["step"] for m in metrics] == list(range(1, 7))
        losses[kind] = [m["loss"] for m in metrics]
        assert (tmp_path / kind / "out" / "general" / "student" / "model.safetensors").is_file()
    assert losses["accelerate"] == pytest.approx(losses["torchrun"], rel=1e-6)

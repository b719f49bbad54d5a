"""Helpers for tests that run real ranks (gloo on CPU) under the real launchers: torchrun for runs that
are to succeed, the deepspeed runner for failures a user sees through it and for the launcher's own tests."""
from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent

WORDS = ("the river town market bridge school garden north south winter summer people built old new "
         "small large green stone road water city village mountain forest history music story family "
         "children teacher station machine light paper book language island ship harbor field farm "
         "king queen war peace year century morning evening travel open close find known called").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_corpus(folder: Path, documents: int = 64, files: int = 2, seed: int = 0) -> Path:
    """Plain text, one document per line, of common English words (real ids for any English vocab)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    handles = [open(folder / f"part-{i}.txt", "w") for i in range(files)]
    for d in range(documents):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))).capitalize() + "."
                     for _ in range(rng.randint(2, 6))]
        handles[d % files].write(" ".join(sentences) + "\n")
    for h in handles:
        h.close()
    return folder


def tiny_teacher(vocab_size: int, layers: int = 4, hidden: int = 64, heads: int = 4) -> dict:
    return {"model_type": "bert", "vocab_size": vocab_size, "hidden_size": hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "intermediate_size": hidden * 2, "max_position_embeddings": 128,
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


def tiny_recipe(tmp: Path, tokenizer: str, vocab_size: int, **sections) -> Path:
    """A recipe for a seconds-long distillation: inline 4-layer teacher, 2-layer student."""
    recipe = {
        "output_dir": str(tmp / "out"),
        "teacher": {"config": tiny_teacher(vocab_size)},
        "student": {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "intermediate_size": 64},
        "data": {"corpus": str(write_corpus(tmp / "corpus")), "tokenizer": tokenizer, "max_seq_len": 32},
        "train": {"max_steps": 6, "micro_batch_size": 4, "log_every": 1, "save_every": 3, "progress_bar": False,
                  "dist_timeout_s": 120},
        "optim": {"lr": 1e-3, "warmup_ratio": 0.0},
    }
    for key, value in sections.items():
        recipe.setdefault(key, {}).update(value)
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def env() -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             PYTHONUNBUFFERED="1")
    e.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_SIZE"):
        e.pop(key, None)
    return e


def deepspeed_cmd(args: list[str], ranks: int = 2) -> list[str]:
    """The deepspeed runner, as users launch the product (`deepspeed --num_gpus N --module ...`)."""
    runner = str(Path(sys.executable).parent / "deepspeed")
    return [runner, "--num_gpus", str(ranks), "--master_port", str(free_port()), "--module", "ernie_tiny_ds.cli",
            *args]


def torchrun_cmd(args: list[str], ranks: int = 2) -> list[str]:
    """torchrun, the other launcher the product supports (tests/test_other_launchers.py). The deepspeed
    runner starts two Python processes of its own before the ranks (runner, then launch.py), each
    importing deepspeed: about 5 s of a 2-core VM per launch. torchrun starts one, importing torch only."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "ernie_tiny_ds.cli", *args]


def run_ranks(args: list[str], ranks: int = 2, timeout: int = 300, check: bool = True,
              runner: str = "torchrun") -> subprocess.CompletedProcess:
    """`ernie_tiny_ds.cli ARGS` on N ranks; output captured, failure shows it.

    runner="torchrun" (default) for runs that are to succeed: what they check is the ranks' work,
    the same under either launcher. runner="deepspeed" for what a user sees through the deepspeed
    runner: a failing run's exit code and its one-line error (torchrun adds a traceback of its own)."""
    cmd = {"torchrun": torchrun_cmd, "deepspeed": deepspeed_cmd}[runner](args, ranks)
    proc = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode} ({runner})\n--- stdout\n{proc.stdout[-6000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def run_cli(args: list[str], timeout: int = 300, cwd: Path = REPO,
            extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """One process, no launcher (`launch` sub-commands start their own)."""
    return subprocess.run([sys.executable, "-m", "ernie_tiny_ds.cli", *args], env={**env(), **(extra_env or {})},
                          cwd=cwd, capture_output=True, text=True, timeout=timeout)


def read_metrics(path: Path) -> list[dict]:
    import json
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def two_node_launch(tmp_path: Path, recipe: Path, node1_prefix: list[str] = (), timeout: int = 400,
                    ) -> tuple[list[int], list[str]]:
    """Two `launch --no-ssh` launchers on this machine (node_rank 0 and 1, one rank each) forming one world
    of 2, running stage 1 of `recipe`; node 1's command is run under `node1_prefix` (e.g. a mount
    namespace of its own). Returns their exit codes and outputs; a launcher still running after
    `timeout` seconds is killed."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port, procs, logs = free_port(), [], []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "ernie_tiny_ds.cli", "launch", "--no-ssh", "--node_rank", str(node),
               "--num_nodes", "2", "--num_gpus", "1", "--hostfile", str(hostfile), "--master_addr", "127.0.0.1",
               "--master_port", str(port), "--", "distill", "--config", str(recipe), "--stage", "general"]
        logs.append(tmp_path / f"node{node}.log")
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen([*(node1_prefix if node == 1 else ()), *cmd], env=env(), cwd=REPO,
                                          stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return codes, [log.read_text() for log in logs]

"""A job whose nodes do not share output_dir stops before any work, in one line (runtime/shared_folder.py).

Two "nodes" on this machine: two launchers (node_rank 0 and 1, one rank each) form one world of 2,
and node 1 runs in a mount namespace of its own where output_dir is bind-mounted over a different,
empty folder: the same path, another disk, as a node-local scratch gives each node of a cluster.
"""
from __future__ import annotations

import shutil
import subprocess

import pytest
from distributed import tiny_recipe, two_node_launch


def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _can_unshare(), reason="needs `unshare -m` (root) for a second node's own view of a path")
def test_nodes_with_their_own_output_dir_are_refused_before_step_1(tmp_path, tokenizer_dir, vocab_size):
    recipe = tiny_recipe(tmp_path, tokenizer_dir, vocab_size)
    out = tmp_path / "out"
    local_disk = tmp_path / "node1-local-disk"
    out.mkdir()
    local_disk.mkdir()
    node1_own_disk = ["unshare", "-m", "sh", "-c", f'mount --bind "{local_disk}" "{out}" && exec "$@"', "node1"]
    codes, text = two_node_launch(tmp_path, recipe, node1_prefix=node1_own_disk, timeout=300)
    both = "\n----\n".join(t[-3000:] for t in text)
    assert codes[0] != 0 and codes[1] != 0, both
    lines = [line for t in text for line in t.splitlines() if f"output_dir {out} is not shared by every node" in line]
    assert lines, both
    assert all("rank 1 on " in line and "node-local disk" in line for line in lines), lines
    assert not any("Traceback" in t for t in text), both
    # refused before any work: no step, no checkpoint, on either disk
    for disk in (out, local_disk):
        assert not (disk / "general" / "metrics.jsonl").exists()
        assert not (disk / "general" / "checkpoints").exists()
    assert not list((out / ".shared-check").glob("*.txt"))  # rank 0 removed its nonce

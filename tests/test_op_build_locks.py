"""A build lock left by a killed DeepSpeed op build must not hang the next job (runtime/op_build_locks.py)."""
from __future__ import annotations

import os
import time

from ernie_tiny_ds.runtime.op_build_locks import STALE_AFTER_S, remove_stale_build_locks


def test_a_dead_builds_lock_is_removed_and_a_live_one_kept(tmp_path, capsys):
    dead = tmp_path / "deepspeed_shm_comm" / "lock"
    live = tmp_path / "py311_cpu" / "cpu_adam" / "lock"
    for lock in (dead, live):
        lock.parent.mkdir(parents=True)
        lock.touch()
    old = time.time() - STALE_AFTER_S - 60
    os.utime(dead, (old, old))
    (dead.parent / "deepspeed_shm_comm.so").write_bytes(b"built")  # what the build made stays
    assert remove_stale_build_locks(tmp_path) == [dead]
    assert not dead.exists() and live.exists() and (dead.parent / "deepspeed_shm_comm.so").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(dead) in err[0] and "waited on it forever" in err[0]


def test_the_default_root_is_torchs_extensions_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()
    old = time.time() - STALE_AFTER_S - 1
    os.utime(lock, (old, old))
    assert remove_stale_build_locks() == [lock]

"""The peer watch reads each peer's rank file once, not every second (the folder may be on a shared
filesystem: N ranks re-reading N files a second), and still names a peer whose process ended. A file
left by an earlier run (its pid now another, newer process's) is read again until its rank rewrites it."""
import json
import os
import socket
import subprocess
import time
from pathlib import Path

from ernie_tiny_ds.runtime import rank_registry


def sleeper() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "120"])


def record(folder: Path, rank: int, pid: int, host: str | None = None) -> None:
    (folder / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "pid": pid,
                                                         "host": host or socket.gethostname()}))


def test_the_watch_reads_each_file_once_and_still_names_a_dead_peer(tmp_path, monkeypatch):
    folder = tmp_path / ".ranks"
    rank_registry.register(folder, rank=0, world=5, watch=False)
    reads = []
    read_text = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (reads.append(self.name), read_text(self, *a, **k))[1])
    peers = [sleeper() for _ in range(3)]
    stale = subprocess.Popen(["true"])
    stale.wait()
    try:
        time.sleep(1.5)  # the files below are written after their processes started, as a rank's own is
        for rank, proc in zip((1, 2), peers):
            record(folder, rank, proc.pid)
        record(folder, 3, peers[2].pid, host="another-host")
        os.utime(folder / "rank3.json", (0, 0))  # another host's file: never checked against this host's processes
        record(folder, 4, os.getpid())  # an earlier run's file whose pid this (older) process has: not trusted yet
        os.utime(folder / "rank4.json", (time.time() - 3600,) * 2)
        assert rank_registry.watched_gone_ranks(0) == []
        first = sorted(n for n in reads if n.startswith("rank"))
        assert first == ["rank1.json", "rank2.json", "rank3.json", "rank4.json"], first
        reads.clear()
        for _ in range(3):
            assert rank_registry.watched_gone_ranks(0) == []
        assert [n for n in reads if n.startswith("rank")] == ["rank4.json"] * 3  # only the untrusted one
        record(folder, 4, peers[2].pid)  # its rank rewrote it
        rank_registry.watched_gone_ranks(0)
        reads.clear()
        rank_registry.watched_gone_ranks(0)
        assert [n for n in reads if n.startswith("rank")] == []

        peers[1].kill()
        peers[1].wait()
        assert rank_registry.watched_gone_ranks(0) == [f"rank 2 (pid {peers[1].pid})"]
        record(folder, 2, stale.pid)  # a dead peer is named as its file's newest version has it
        assert rank_registry.watched_gone_ranks(0) == [f"rank 2 (pid {stale.pid})"]
    finally:
        for proc in peers:
            proc.kill()
            proc.wait()

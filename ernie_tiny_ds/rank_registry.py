"""Which process is which rank, so that a rank that loses a peer can name the one that died.

The deepspeed launcher cannot: it reports the return code of whichever child it polls first,
under the command line of the last one it started. Each rank records its pid and host at start;
a survivor checks which ranks on its own host are gone (processes on other nodes it cannot see).
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from .checkpoint import atomic_write_text

_folder: Path | None = None
_world = 0


def register(folder: Path, rank: int, world: int) -> None:
    global _folder, _world
    _folder, _world = Path(folder), world
    _folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(_folder / f"rank{rank}.json",
                      json.dumps({"rank": rank, "pid": os.getpid(), "host": socket.gethostname()}))


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return "\nState:\tZ" not in status  # a killed child stays a zombie until the launcher reaps it


def gone_ranks(me: int, wait_s: float = 2.0) -> list[str]:
    """The other ranks of this host whose process has ended, e.g. ['rank 1 (pid 4242)']."""
    if _folder is None:
        return []
    deadline = time.monotonic() + wait_s
    while True:
        gone = []
        for rank in range(_world):
            path = _folder / f"rank{rank}.json"
            if rank == me or not path.is_file():
                continue
            info = json.loads(path.read_text())
            if info["host"] == socket.gethostname() and not _alive(int(info["pid"])):
                gone.append(f"rank {rank} (pid {info['pid']})")
        if gone or time.monotonic() >= deadline:
            return gone
        time.sleep(0.2)  # the failing rank may still be on its way out


PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")


def describe_peer_loss(exc: BaseException) -> str | None:
    """One line for a collective that failed because another rank is gone (gloo/NCCL), naming that
    rank when it ran on this host; None when `exc` is not that (a one-process run has no peers)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    backend_error = getattr(dist, "DistBackendError", ())
    if not (isinstance(exc, backend_error) or any(text in str(exc) for text in PEER_LOST)):
        return None
    rank = dist.get_rank()
    who = ", ".join(gone_ranks(rank)) or "another rank"
    return (f"[rank {rank}] error: {who} left the job during a collective operation "
            f"({str(exc).splitlines()[0][:160]}); see its own message, if any")

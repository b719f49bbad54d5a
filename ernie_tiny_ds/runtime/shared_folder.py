"""Every rank must see the one output folder rank 0 writes: checkpoints, exports and the peer watch rely on it.

Rank 0 alone creates, manifests and renames a checkpoint folder, and reads every rank's shards when
it exports; each rank finds the others' trainer state at resume, and the peer watch reads every
rank's pid file. On a cluster whose nodes each write to a disk of their own at the same path (a
node-local scratch), none of that holds: the other nodes keep `.partial` folders nobody finishes, a
resume finds a checkpoint with one node's ranks only, and the export misses shards. So before any
work the job checks it: rank 0 writes a random nonce into the folder, and after a broadcast (which
orders the write before the reads) every rank looks for it. A rank that cannot see it stops the job
with one line naming the folder, the ranks and hosts that do not share it, and the fix.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import socket
import time
from pathlib import Path

from ..errors import UserError
from ..files import atomic_write_text
from .collectives import all_gather_objects, broadcast_object

PROBE_DIR = ".shared-check"
# A network filesystem can answer a lookup from a cache for a few seconds (NFS keeps negative
# entries up to acdirmax, 60 s at most, 30 s by default, but a fresh file in a folder whose
# attributes changed is normally seen at once); polling this long separates a slow cache from a
# disk of its own without holding a healthy job back: the file is usually there on the first look.
DEFAULT_WAIT_S = 15.0


def _appears(path: Path, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        with contextlib.suppress(OSError):
            os.listdir(path.parent)  # listing the folder revalidates its cached attributes on NFS
        if path.is_file():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.25)


def require_shared_folder(folder: Path, rank: int, world: int, key: str = "output_dir",
                          wait_s: float = DEFAULT_WAIT_S) -> None:
    """Collective (every rank calls it): returns when every rank sees the file rank 0 wrote in `folder`."""
    if world <= 1:
        return
    folder = Path(folder)
    probe = None
    if rank == 0:
        (folder / PROBE_DIR).mkdir(parents=True, exist_ok=True)
        probe = folder / PROBE_DIR / f"{secrets.token_hex(16)}.txt"
        atomic_write_text(probe, f"{socket.gethostname()} {os.getpid()}\n")  # fsynced: durable before the broadcast
    name = broadcast_object(probe.name if probe is not None else None)
    seen = rank == 0 or _appears(folder / PROBE_DIR / name, wait_s)
    views = all_gather_objects((seen, socket.gethostname()))
    if probe is not None:  # every rank has looked: the nonce has done its job, and leaves no trace
        with contextlib.suppress(OSError):
            probe.unlink()
            probe.parent.rmdir()
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(views) if not ok]
    if blind:
        raise UserError(f"{key} {folder} is not shared by every node: {', '.join(blind)} cannot see what rank 0 "
                        f"(on {views[0][1]}) wrote there within {wait_s:g} s; put {key} on a filesystem every "
                        f"node mounts at the same path (NFS, Lustre, GPFS, ...), not a node-local disk")

"""How a train loader feeds its device: DataLoader worker processes and pinned host memory.

`data.num_workers: auto` (the default) resolves per device:
  * CPU: 0, batches are made in the training process. A CPU rank's step already runs on every core it
    has (torch's intra-op threads), so a worker would only take cores from the step it should hide behind.
  * CUDA: WORKERS_ON_CUDA, fewer where the node's cores per rank are too few to spare them. The step runs
    on the GPU and leaves the host idle, so tokenising the next batches in workers overlaps it; two
    workers with prefetch_factor 2 keep four batches ready, more only multiply each worker's shuffle
    window in host memory.
Pinned (page-locked) memory only where there is a CUDA device to copy to and workers to pin in the
background (DataLoader's pin thread): the copy to the GPU can then run asynchronously (non_blocking).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

WORKERS_ON_CUDA = 2


def cores_per_rank() -> int:
    """This process's cores shared among the node's ranks (LOCAL_SIZE, set by the launchers)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(os.environ.get("LOCAL_SIZE") or 1)))


def default_num_workers(device) -> int:
    """What `data.num_workers: auto` means for batches bound for `device` (see the module)."""
    if torch.device(device).type != "cuda":
        return 0
    return max(0, min(WORKERS_ON_CUDA, cores_per_rank() - 1))  # one core stays with the training process


@dataclass(frozen=True)
class Loading:
    """How a loader makes its batches: in the training process (0 workers) or in worker processes,
    and whether they come in pinned memory."""
    num_workers: int = 0
    pin_memory: bool = False

    @classmethod
    def for_device(cls, num_workers: int | str, device) -> "Loading":
        """data.num_workers (an int, or "auto") for batches bound for `device`."""
        workers = default_num_workers(device) if num_workers == "auto" else int(num_workers)
        pinned = torch.device(device).type == "cuda" and workers > 0 and torch.cuda.is_available()
        return cls(workers, pinned)

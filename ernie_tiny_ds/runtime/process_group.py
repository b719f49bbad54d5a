"""The process group: joining (or creating) it, the backend for train.dist_backend, and this rank's device.

Every rank calls init_distributed first; device() and device_index() say where its tensors and
DeepSpeed's engines live.
"""
from __future__ import annotations

import contextlib
import glob
import inspect
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import ConfigError
from .collectives import bound_later_groups, control_group, gloo_interface_from_nccl
from .op_build_locks import remove_stale_build_locks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: int, backend: str = "auto") -> tuple[int, int]:
    """Join (or, run without a launcher, create) the process group; returns (rank, world_size).

    backend "auto" is the accelerator's own (NCCL on CUDA, gloo on CPU); "gloo" on CUDA lets
    several ranks share one GPU (tensors cross through the host: slow, but every code path runs).
    Every group of the job, DeepSpeed's included, waits at most `timeout_s` for a silent peer."""
    import deepspeed  # not at the top: its import picks an accelerator and logs, in `launch` too (it parses a
    #                   training command's arguments, which imports this module, and trains nothing)

    if "RANK" not in os.environ:  # a plain `ernie-tiny-ds …` run: one process, no launcher
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if not dist.is_initialized():
        dist_backend = process_group_backend(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(device_index())
        gloo_interface_from_nccl()  # before the first group: gloo reads it when a group is made
        timeout = timedelta(seconds=timeout_s)
        bound_later_groups(timeout)
        remove_stale_build_locks()  # else a build killed in an earlier run hangs this one in the op build below
        try:
            if torch.cuda.is_available():  # the group on this rank's own device, which DeepSpeed would not pick
                dist.init_process_group(**cuda_group_args(dist_backend, timeout))
            deepspeed.init_distributed(dist_backend=dist_backend, timeout=timeout, verbose=False)
            control_group(timeout)  # made here, at the same point on every rank (creating a group is collective)
            release_shm_buffer_names()  # its barrier is the first collective: NCCL builds its communicator there
        except RuntimeError as exc:
            said = [line.strip() for line in str(exc).splitlines() if "Duplicate GPU detected" in line]
            if said:
                raise ConfigError(_SHARED_GPU.format(detail=said[0][:200])) from None
            raise
    return dist.get_rank(), dist.get_world_size()


_SHARED_GPU = ("train.dist_backend: NCCL refuses two ranks on one GPU ({detail}); use train.dist_backend=gloo "
               "to share a GPU, or fewer ranks")


def _visible_devices() -> list[str] | None:
    """CUDA_VISIBLE_DEVICES as a list (None when unset: every GPU of the node is visible)."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return None if value is None else [d.strip() for d in value.split(",") if d.strip()]


def process_group_backend(backend: str) -> str | None:
    """The torch backend for train.dist_backend (None: DeepSpeed's choice for the accelerator).

    "nccl" is refused up front only where two local ranks surely land on one GPU: every local rank
    sees the same devices (CUDA_VISIBLE_DEVICES unset, or a list the launcher gave them all with one
    entry per rank) and there are fewer GPUs than ranks. A list shorter than the node's ranks is a
    binding per rank (Slurm's --gpus-per-task, --gpu-bind): each rank sees its own GPU, and NCCL's
    own check at its first communicator names a real duplicate (init_distributed turns it into
    the same line)."""
    cuda = torch.cuda.is_available()
    if backend == "auto":
        return None
    if backend == "nccl":
        if not cuda:
            raise ConfigError("train.dist_backend: 'nccl' needs CUDA devices and none is visible; use 'auto' or 'gloo'")
        local_size, count = int(os.environ.get("LOCAL_SIZE", "1")), torch.cuda.device_count()
        visible = _visible_devices()
        shared_view = visible is None or len(visible) >= local_size
        if shared_view and local_size > count:
            raise ConfigError(_SHARED_GPU.format(detail=f"{local_size} ranks on this node, {count} GPU(s)"))
        return "nccl"
    return "gloo"


def cuda_group_args(backend: str | None, timeout: timedelta) -> dict:
    """init_process_group's arguments on CUDA. DeepSpeed binds an NCCL group to cuda:LOCAL_RANK, a device
    that a rank shown only its own GPU (Slurm --gpus-per-task=1: LOCAL_RANK 5, one visible device), or
    the second of two ranks sharing one GPU, does not have. Made here first, DeepSpeed adopts the group."""
    args = {"backend": backend or "nccl", "timeout": timeout}
    # device_id binds NCCL's communicator eagerly; torch 2.6.x-2.7.0 could hang with it (DeepSpeed skips it there)
    hangs = torch.__version__.split("+")[0].startswith(("2.6.", "2.7.0"))
    if args["backend"] == "nccl" and not hangs and "device_id" in inspect.signature(dist.init_process_group).parameters:
        args["device_id"] = torch.device("cuda", device_index())
    return args


def device_index() -> int:
    """This rank's CUDA device: LOCAL_RANK, wrapped round when ranks share GPUs (gloo backend). A rank
    bound to its own GPU by the scheduler sees only that one, so it lands on index 0."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return local_rank % count if count else local_rank


def release_shm_buffer_names() -> None:
    """DeepSpeed's CPU shared-memory all-reduce creates a 69 MB /dev/shm file per rank and never
    removes it, so every run (and every killed one) leaks RAM until the machine runs out. Once all
    ranks are through init_distributed, each has mapped its peers' files; the names can go then
    and the mappings stay valid until the processes exit."""
    if dist.get_world_size() > 1:
        dist.barrier()  # every rank, files or not: a barrier some ranks skip would hang the others
    pattern = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{os.environ.get('MASTER_PORT', '*')}_*"
    for path in glob.glob(pattern):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator  # not at the top: see init_distributed

    acc = get_accelerator()
    if acc.device_name() == "cpu":
        return torch.device("cpu")
    return torch.device(acc.device_name(), device_index())

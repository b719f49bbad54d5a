"""Control-plane collectives: the tiny values all ranks must agree on (finite-loss flags, loss means
for the log, stop requests, the checkpoint every rank resumes from).

Gradients and parameters move on the accelerator's backend (NCCL on CUDA). Under NCCL the default
process group has no CPU backend, and torch refuses a collective on a CPU tensor there ("No backend
type associated with device type cpu"). These values live on the host (they end in `.item()` or a
Python object), so they get a gloo group of their own when the default group cannot carry CPU
tensors. Why not move them to the GPU instead: every one of them is read on the host right after
the collective, a gloo group also serves a job whose ranks share one GPU, and a CPU-only test can
build the NCCL situation (a "cuda:gloo" default group) and exercise exactly the code a GPU job runs.
"""
from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

_CPU_CAPABLE = ("gloo", "mpi", "ucc")  # backends that take CPU tensors when named without a device
_control: dict[int, Any] = {}          # id(default group) -> its control group (None: the default one)
_patient: dict[int, Any] = {}          # id(default group) -> its gloo group for waits on rank 0's work
# Rank-0-only work (an export, a dev evaluation, the report) can outlast train.dist_timeout_s; the
# ranks that wait for it use a group without a practical timeout. A rank 0 that dies still ends the
# wait at once: its gloo connections close, and the peer watch sees its process end.
PATIENT_TIMEOUT = timedelta(days=30)


def _serves_cpu(config: str) -> bool:
    """Whether a backend config such as "nccl", "gloo", "cuda:gloo" or "cpu:gloo,cuda:nccl" takes CPU tensors."""
    for part in config.lower().split(","):
        device, _, backend = part.strip().rpartition(":")
        if device == "cpu" or (device == "" and backend in _CPU_CAPABLE):
            return True
    return False


def control_group(timeout: timedelta | None = None):
    """The process group for control-plane collectives: the default one when it serves CPU tensors,
    else a gloo group created once (collective: every rank calls this at the same point; the trainer
    does so right after the process group is made, with train.dist_timeout_s as `timeout`, so a
    stalled peer ends the wait after that long instead of torch's 30 minutes)."""
    default = dist.group.WORLD
    key = id(default)
    if key not in _control:
        _control.clear()  # a new default group (tests create several in one process)
        cpu_capable = _serves_cpu(dist.get_backend_config())
        _control[key] = None if cpu_capable else dist.new_group(backend="gloo", timeout=timeout)
        _patient.clear()
        _patient[key] = dist.new_group(backend="gloo", timeout=PATIENT_TIMEOUT)
    return _control[key]


def bound_later_groups(timeout: timedelta) -> None:
    """Give every process group made after this call `timeout` unless its maker names one.

    DeepSpeed makes groups of its own without a timeout: the clone of the world that carries every
    gradient all-reduce, ZeRO's partition groups. torch then applies its default, 30 minutes under
    gloo and 10 under NCCL, so a stalled (not dead) peer would hold the other ranks that long
    whatever train.dist_timeout_s says. torch reads that default from these two module values at
    each new_group() call; torch has no public setter for them."""
    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if isinstance(getattr(c10d, name, None), timedelta):  # None where torch was built without NCCL
            setattr(c10d, name, timeout)


def gloo_interface_from_nccl(env: MutableMapping[str, str] = os.environ,
                             interfaces: list[str] | None = None) -> str | None:
    """Set GLOO_SOCKET_IFNAME from NCCL_SOCKET_IFNAME when only the latter is set; returns what it set.

    Under NCCL the control plane still crosses the network over gloo, which otherwise takes the
    address the host name resolves to: a loopback or unroutable one on many clusters, and group
    creation then hangs. NCCL's value names interface prefixes ("eth", "ib0,ib1") or, after "=",
    exact names; gloo takes exact names, so the first interface of this host that matches is used.
    An exclusion list ("^docker,lo") has no gloo form and is left alone."""
    wanted = env.get("NCCL_SOCKET_IFNAME", "").strip()
    if env.get("GLOO_SOCKET_IFNAME") or not wanted or wanted.startswith("^"):
        return None
    exact = wanted.startswith("=")
    present = [name for _, name in socket.if_nameindex()] if interfaces is None else interfaces
    for pattern in filter(None, (part.strip() for part in wanted.lstrip("=").split(","))):
        match = next((name for name in present if name == pattern or (not exact and name.startswith(pattern))), None)
        if match is not None:
            env["GLOO_SOCKET_IFNAME"] = match
            return match
    return None


def wait_for_rank0() -> None:
    """Every rank calls it where rank 0 did work of its own (an export, a dev evaluation, the report):
    a barrier that waits as long as that work takes, not train.dist_timeout_s."""
    if not _active():
        return
    control_group()  # made at start-up; here only when a test built the default group itself
    dist.barrier(group=_patient[id(dist.group.WORLD)])


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_values(values: list[float], op: str = "sum") -> list[float]:
    """Host numbers reduced over every rank ("sum", "min" or "max"); unchanged in a one-rank job."""
    if not _active():
        return [float(v) for v in values]
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    flat = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(flat, op=ops[op], group=control_group())
    return flat.tolist()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` as rank `src` has it, on every rank (any picklable value)."""
    if not _active():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src, group=control_group(), device=torch.device("cpu"))
    return holder[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=control_group())
    return out

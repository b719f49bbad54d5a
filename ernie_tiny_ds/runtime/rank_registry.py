"""Which process is which rank, so that a rank that loses a peer can name the one that died.

The deepspeed launcher cannot: it reports the return code of whichever child it polls first,
under the command line of the last one it started. Each rank records its pid and host at start;
a survivor checks which ranks on its own host are gone (processes on other nodes it cannot see).

Two ways a survivor learns of a dead peer: a collective fails (gloo: "Connection closed by peer")
and `describe_peer_loss` turns the error into one line; or, where no error ever comes (NCCL waits
for a dead peer until its timeout, then its watchdog aborts the process with no word of which rank
died), a watch thread sees the peer's process gone and ends this rank with the same line.

A stalled peer (stopped, or stuck) is alive: only train.dist_timeout_s ends the collective that
waits for it. `describe_peer_loss` then names the peers of this host whose process is stopped.

The watch reads each peer's file once (the folder may sit on a shared filesystem, where N ranks
re-reading N files every second add up): a rank's pid does not change while the job runs. After that
each tick only looks at this host's /proc. A file is read again while it is missing (its rank has
not registered yet), names a process that is gone, or names one that started after the file was
written (a file left from an earlier run whose pid a new process took): such a file may be
rewritten by its rank at any moment.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from ..files import atomic_write_text

_folder: Path | None = None
_world = 0
_rank = 0
_watch_stop = threading.Event()
_watch: threading.Thread | None = None
_report_lock = threading.Lock()  # one line per rank, from the watch or from the failed collective
_known: dict[int, dict] = {}      # rank -> its file's record, as the watch last read it


def register(folder: Path, rank: int, world: int, watch: bool = True) -> None:
    """Record this rank's pid under `folder`; with `watch`, also start the peer watch (multi-rank jobs)."""
    global _folder, _world, _rank
    _folder, _world, _rank = Path(folder), world, rank
    _known.clear()
    _folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(_folder / f"rank{rank}.json",
                      json.dumps({"rank": rank, "pid": os.getpid(), "host": socket.gethostname()}))
    if watch and world > 1:
        start_watch()


# a tick reads only this host's /proc (each peer's file once): cheap enough to look four times a second,
# so a survivor names a dead peer before the deepspeed launcher, which polls its children once a second,
# kills the survivors too
WATCH_INTERVAL_S = 0.25


def start_watch(interval_s: float = WATCH_INTERVAL_S) -> None:
    """A daemon thread that ends this rank, with one line naming the peer, once a rank of this host
    has died. Stopped by stop_watch() before the clean shutdown, where ranks leave at their own pace."""
    global _watch
    _watch_stop.clear()
    if _watch is not None and _watch.is_alive():
        return

    def loop() -> None:
        while not _watch_stop.wait(interval_s):
            gone = watched_gone_ranks(_rank)
            if gone and not _watch_stop.is_set():
                report_and_exit(f"[rank {_rank}] error: {', '.join(gone)} left the job (its process ended while "
                                "this rank was still working); see its own message, if any")

    _watch = threading.Thread(target=loop, name="peer-watch", daemon=True)
    _watch.start()


def stop_watch() -> None:
    _watch_stop.set()


def report_and_exit(line: str, code: int = 1) -> None:
    """Print one line and end the process at once (a peer may hold this rank in a collective forever)."""
    if _report_lock.acquire(blocking=False):
        print(line, file=sys.stderr, flush=True)
        os._exit(code)
    threading.Event().wait()  # the other reporter is already ending the process


def _alive(pid: int) -> bool:
    return _state(pid) not in (None, "Z")  # a killed child stays a zombie until the launcher reaps it


def _record(rank: int) -> dict | None:
    """What rank `rank` recorded about itself; None before it has."""
    path = _folder / f"rank{rank}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _written_by_its_process(rank: int, info: dict) -> bool:
    """Whether rank `rank`'s file was written by the process it names (not by an earlier run whose pid
    a newer process reuses): that process started before the file was written."""
    if info["host"] != socket.gethostname():
        return True  # another host's pid: never looked at
    started = _started_at(int(info["pid"]))
    try:
        written = (_folder / f"rank{rank}.json").stat().st_mtime
    except FileNotFoundError:
        return False
    return started is not None and started <= written + 1.0  # + the clock's tick and the mtime's granularity


def _started_at(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), from /proc; None when there is no such process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        boot = next(float(x.split()[1]) for x in Path("/proc/stat").read_text().splitlines() if x.startswith("btime"))
    except (FileNotFoundError, ProcessLookupError, StopIteration):
        return None
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start time in clock ticks


def _host_peers(me: int):
    """(rank, pid) of every other rank that recorded itself on this host (other hosts' pids mean nothing here)."""
    if _folder is None:
        return
    for rank in range(_world):
        info = None if rank == me else _record(rank)
        if info is not None and info["host"] == socket.gethostname():
            yield rank, int(info["pid"])


def watched_gone_ranks(me: int) -> list[str]:
    """gone_ranks for the watch's tick: each file read once while its process lives (see the module's note)."""
    if _folder is None:
        return []
    here, gone = socket.gethostname(), []
    for rank in (r for r in range(_world) if r != me):
        info = _known.get(rank)
        if info is None or (info["host"] == here and not _alive(int(info["pid"]))):
            _known.pop(rank, None)
            info = _record(rank)  # not read yet, or its newest version before naming a dead process
            if info is None:
                continue
            if _written_by_its_process(rank, info):
                _known[rank] = info
        if info["host"] == here and not _alive(int(info["pid"])):
            gone.append(f"rank {rank} (pid {info['pid']})")
    return gone


def gone_ranks(me: int, wait_s: float = 2.0) -> list[str]:
    """The other ranks of this host whose process has ended, e.g. ['rank 1 (pid 4242)']."""
    deadline = time.monotonic() + wait_s
    while True:
        gone = [f"rank {rank} (pid {pid})" for rank, pid in _host_peers(me) if not _alive(pid)]
        if gone or _folder is None or time.monotonic() >= deadline:
            return gone
        time.sleep(0.2)  # the failing rank may still be on its way out


def stopped_ranks(me: int) -> list[str]:
    """The other ranks of this host whose process exists but is stopped (SIGSTOP, Ctrl-Z, a debugger)."""
    return [f"rank {rank} (pid {pid})" for rank, pid in _host_peers(me) if _state(pid) in ("T", "t")]


def _state(pid: int) -> str | None:
    """The process state letter of /proc/PID/status (R, S, D, T, t, Z, …); None when there is no such process."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    line = next((x for x in status.splitlines() if x.startswith("State:")), "State:\t?")
    return line.split()[1]


PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted")
# a collective that waited train.dist_timeout_s for a peer that never answered (gloo; NCCL's watchdog)
PEER_SILENT = ("Timed out waiting", "Watchdog caught collective operation timeout")


def describe_peer_loss(exc: BaseException) -> str | None:
    """One line for a collective that failed because another rank is gone or silent (gloo/NCCL), naming
    that rank when it ran on this host; None when `exc` is not that (a one-process run has no peers)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    backend_error = getattr(dist, "DistBackendError", ())
    text = str(exc)
    silent = any(t in text for t in PEER_SILENT)
    if not (silent or isinstance(exc, backend_error) or any(t in text for t in PEER_LOST)):
        return None
    rank = dist.get_rank()
    detail = text.splitlines()[0][:160] if text else type(exc).__name__
    gone = gone_ranks(rank)
    stopped = [] if gone else stopped_ranks(rank)
    if stopped:
        return (f"[rank {rank}] error: {', '.join(stopped)} stopped responding: its process is stopped (SIGSTOP, "
                f"Ctrl-Z or a debugger) and this rank gave up waiting for it after train.dist_timeout_s ({detail})")
    if silent and not gone:
        return (f"[rank {rank}] error: another rank stopped responding (on another host, or stuck in its own "
                f"work) and this rank gave up waiting for it after train.dist_timeout_s ({detail})")
    return (f"[rank {rank}] error: {', '.join(gone) or 'another rank'} left the job during a collective operation "
            f"({detail}); see its own message, if any")

"""Graceful stop on request: a STOP file in the output folder, or SIGUSR1 (what Slurm sends before
a time limit or pre-emption). All ranks agree at a step boundary, save a checkpoint and exit; the
same command run again resumes there.

The SIGUSR1 handler is installed once per process (at pipeline start, or by the first
StopRequest) and sets a process-wide flag, so a signal that arrives between two pipeline stages
(during an export, or while the next stage builds its models) is kept until a stage, or the
pipeline's check between stages, consumes it."""
from __future__ import annotations

import signal
from pathlib import Path

from .collectives import all_reduce_values

STOP_FILE = "STOP"

_signalled = False
_installed = False


def _on_signal(_signum, _frame) -> None:
    global _signalled
    _signalled = True


def install() -> None:
    """Catch SIGUSR1 from now on in this process (idempotent; the default action would end it)."""
    global _installed
    if _installed:
        return
    try:
        signal.signal(signal.SIGUSR1, _on_signal)
        _installed = True
    except ValueError:  # not the main thread (e.g. called from a test harness)
        pass


def signalled() -> bool:
    """Whether this process got SIGUSR1 that no stop request has consumed yet."""
    return _signalled


class StopRequest:
    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / STOP_FILE
        install()

    def requested(self) -> bool:
        """Collective: True on every rank if any rank saw the file or the signal. The signal is
        consumed on every rank once all agree (the caller acts on it); the file stays until clear()."""
        global _signalled
        (flag,) = all_reduce_values([1.0 if (_signalled or self.path.exists()) else 0.0], "max")
        if flag:
            _signalled = False
        return bool(flag)

    def clear(self) -> None:
        """Consume the request so the next run is not stopped by it."""
        global _signalled
        _signalled = False
        self.path.unlink(missing_ok=True)

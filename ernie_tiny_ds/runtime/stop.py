"""Graceful stop on request: a STOP file in the output folder, or SIGUSR1 (what Slurm sends before
a time limit or pre-emption). All ranks agree at a step boundary, save a checkpoint and exit; the
same command run again resumes there."""
from __future__ import annotations

import signal
from pathlib import Path

from .collectives import all_reduce_values

STOP_FILE = "STOP"


class StopRequest:
    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / STOP_FILE
        self._signalled = False
        try:
            signal.signal(signal.SIGUSR1, self._on_signal)
        except ValueError:  # not the main thread (e.g. called from a test harness)
            pass

    def _on_signal(self, _signum, _frame) -> None:
        self._signalled = True

    def requested(self) -> bool:
        """Collective: True on every rank if any rank saw the file or the signal."""
        (flag,) = all_reduce_values([1.0 if (self._signalled or self.path.exists()) else 0.0], "max")
        return bool(flag)

    def clear(self) -> None:
        """Consume the request so the next run is not stopped by it."""
        self._signalled = False
        self.path.unlink(missing_ok=True)

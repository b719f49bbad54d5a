"""When a training loop saves, and the save itself (runtime.checkpoint.save).

After each optimizer step the loop asks `after_step(step)`: it saves every `every` steps, at the
last step (unless the run's output replaces its checkpoints: teacher finetuning), and when the
run ends early (a stop request: STOP file or SIGUSR1, or `stop_at_step`); it answers whether the
loop must stop. Collective: every rank calls it at the same step.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from . import checkpoint
from .stop import StopRequest


class Checkpointer:
    def __init__(self, engine, root: Path, loader, every: int, last_step: int, keep: int,
                 stop_request: StopRequest, stop_at_step: int | None = None, save_last: bool = True,
                 extra_files: Callable[[Path], None] | None = None):
        self.engine, self.root, self.loader = engine, Path(root), loader
        self.every, self.last_step, self.keep = every, last_step, keep
        self.stop_request, self.stop_at_step, self.save_last = stop_request, stop_at_step, save_last
        self.extra_files = extra_files
        self.requested = False  # whether the last after_step saw a stop request (vs stop_at_step)

    def due(self, step: int) -> bool:
        if step == self.last_step:
            return self.save_last
        return step % self.every == 0

    def after_step(self, step: int) -> bool:
        """Save if this step is due (or the run stops here); True when the loop must stop."""
        self.requested = self.stop_request.requested()
        stopping = self.requested or step == self.stop_at_step
        if stopping or self.due(step):
            self.save(step)
        return stopping

    def save(self, step: int) -> Path:
        state = checkpoint.trainer_state(step, self.loader)
        return checkpoint.save(self.engine, self.root, step, state, extra_files=self.extra_files, keep=self.keep)

    def ensure_saved(self, step: int) -> Path:
        """The checkpoint of `step` (an export reads it): saved now unless it exists (a re-run of a finished stage)."""
        folder = self.root / checkpoint.tag_for(step)
        return folder if folder.is_dir() else self.save(step)

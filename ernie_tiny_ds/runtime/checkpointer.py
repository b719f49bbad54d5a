"""When a training loop saves, and the save itself (runtime.checkpoint.save).

After each optimizer step the loop asks `after_step(step, check_stop)`: it saves every `every`
steps, at the last step (unless the run's output replaces its checkpoints: teacher finetuning), and
when the run ends early (a stop request: STOP file or SIGUSR1, or `stop_at_step`); it answers
whether the loop must stop. The ranks agree on a stop request only where the loop says to check
(a collective: the loop checks every train.log_every steps and at each save). Collective: every
rank calls it at the same step.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import checkpoint
from .checkpoint import CheckpointedRun
from .stop import StopRequest


@dataclass(frozen=True)
class SaveSchedule:
    every: int                         # train.save_every
    last_step: int
    keep: int                          # train.keep_checkpoints
    stop_at_step: int | None = None    # train.stop_at_step: save and stop there
    save_last: bool = True             # False: the run's final output replaces its checkpoints


class Checkpointer:
    def __init__(self, run: CheckpointedRun, schedule: SaveSchedule, stop_request: StopRequest,
                 extra_files: Callable[[Path], None] | None = None):
        self.run, self.schedule, self.stop_request = run, schedule, stop_request
        self.extra_files = extra_files  # files beside the engine's in each checkpoint (rank 0)
        self.requested = False  # whether the last after_step saw a stop request (vs stop_at_step)

    def due(self, step: int) -> bool:
        if step == self.schedule.last_step:
            return self.schedule.save_last
        return step % self.schedule.every == 0

    def saves_at(self, step: int) -> bool:
        """Whether `step` saves whatever a stop request says."""
        return self.due(step) or step == self.schedule.stop_at_step

    def after_step(self, step: int, check_stop: bool = True) -> bool:
        """Save if this step is due (or the run stops here); True when the loop must stop."""
        self.requested = check_stop and self.stop_request.requested()
        stopping = self.requested or step == self.schedule.stop_at_step
        if stopping or self.due(step):
            self.save(step)
        return stopping

    def save(self, step: int) -> Path:
        run = self.run
        state = checkpoint.trainer_state(step, run.loader)
        return checkpoint.save(run.engine, run.root, step, state, extra_files=self.extra_files,
                               keep=self.schedule.keep, recipe=run.recipe.fingerprint)

    def ensure_saved(self, step: int) -> Path:
        """The checkpoint of `step` (an export reads it): saved now unless it exists (a re-run of a finished stage)."""
        folder = self.run.root / checkpoint.tag_for(step)
        return folder if folder.is_dir() else self.save(step)

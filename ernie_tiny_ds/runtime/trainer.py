"""The training loop, one for every job: the distillation stages (runtime/loop.py) and teacher
finetuning (workflows/finetune.py).

    until the last step:
        a micro-batch on the device -> step_fn (runtime/step.py: forward, backward, and at the
        optimizer step's last micro-batch the finite check and the step)
        a non-finite loss: the step is skipped on every rank, and the job's policy decides (count
        the skip, or end the run)
        after an optimizer step: its losses kept on the device -> hooks -> on a checking step
        (train.log_every, a save, the last step) all kept steps reduced over ranks -> log ->
        stop when asked -> checkpoint when due

Every rank runs it in step: the finite check, the reduction, the stop check and the checkpoint are
collectives. The host waits for the device once per optimizer step (the finite check) and once more
on a checking step (the losses).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Protocol, Sequence

import torch
import torch.distributed as dist

from ..errors import UserError
from .checkpointer import Checkpointer
from .collectives import all_reduce_values
from .metrics import MetricsLogger
from .step import StepResult, Window


class NonFiniteLoss(UserError):
    pass


class NonFinitePolicy(Protocol):
    skipped: int  # optimizer steps skipped since the run (re)started

    def skip(self, step: int, result: StepResult, logger: MetricsLogger, micro_batches: int = 1) -> None:
        """A non-finite loss at `step` (the step being tried, skipped with its micro-batches): raise to end the run."""

    def reset(self) -> None:
        """A finite loss: the run of non-finite ones in a row is over."""


class SkipNonFinite:
    """The stages': the optimizer step is skipped on every rank, with a warning; `limit` in a row end the run."""

    def __init__(self, limit: int, what: str):
        self.limit, self.what = limit, what
        self.in_a_row = self.skipped = 0

    def skip(self, step: int, result: StepResult, logger: MetricsLogger, micro_batches: int = 1) -> None:
        self.in_a_row, self.skipped = self.in_a_row + 1, self.skipped + 1
        bad = [n for n, v in result.terms.items() if not torch.isfinite(v)] or ["total"]
        what = "micro-batch skipped" if micro_batches == 1 else f"the step's {micro_batches} micro-batches skipped"
        logger.message(f"warning: non-finite loss ({', '.join(bad)}) at step {step}: {what}")
        if self.in_a_row >= self.limit:
            raise NonFiniteLoss(f"{self.in_a_row} consecutive non-finite losses (term: {', '.join(bad)}) at step "
                                f"{step} of {self.what}; lower optim.lr or check the data")

    def reset(self) -> None:
        self.in_a_row = 0


class FailOnNonFinite:
    """Teacher finetuning's: the first non-finite loss ends the run with one line naming what to change."""
    skipped = 0

    def __init__(self, what: str, hint: str):
        self.what, self.hint = what, hint

    def skip(self, step: int, result: StepResult, logger: MetricsLogger, micro_batches: int = 1) -> None:
        raise NonFiniteLoss(f"{self.what}: non-finite loss at step {step}; {self.hint}")

    def reset(self) -> None:
        pass


def on_device(batches: Iterable[dict[str, torch.Tensor]], dev: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """Every tensor of each batch (labels too) on `dev`, fetched one at a time as the loop asks (the
    loader's saved position is the batches it handed out); pinned host memory copies asynchronously."""
    for batch in batches:
        yield {k: v.to(dev, non_blocking=True) for k, v in batch.items()}


@dataclass
class PendingStep:
    """An optimizer step not yet logged: its losses and tokens stay on the device until a logging step."""
    step: int
    names: list[str]            # "loss" and the loss terms, in `values`' order
    values: torch.Tensor        # this rank's [total, *terms, tokens] (device)
    positions: int              # this rank's positions (tokens and padding) in the step's micro-batches
    flops: float                # this rank's matmul FLOPs of the step
    lr: float
    skipped: int                # optimizer steps skipped for a non-finite loss so far
    at: float                   # host clock when the step was queued (what times it: one host read per step)

    @classmethod
    def of(cls, step: int, result: StepResult, tokens, positions: int, flops: float, skipped: int) -> "PendingStep":
        """The step that `result` ended, its losses and `tokens` (a device tensor) kept on the device."""
        losses = {"loss": result.total, **result.terms}
        names = sorted(losses)
        values = torch.stack([*(losses[n].float().reshape(()) for n in names),
                              torch.as_tensor(tokens).float().reshape(())])
        return cls(step, names, values, positions, flops, result.lr, skipped, time.perf_counter())


def reduce_pending(pending: list[PendingStep]) -> list[tuple[PendingStep, dict[str, float], float, float]]:
    """Each pending step's loss terms averaged over ranks, its tokens and positions summed over ranks:
    one host read and one control-plane collective for all of them."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    local = torch.stack([p.values.detach().to(torch.float64) for p in pending]).tolist()
    flat = [v for row, p in zip(local, pending) for v in (*row, float(p.positions))]
    sums = all_reduce_values(flat, "sum")
    out, at = [], 0
    for p in pending:
        row = sums[at:at + len(p.names) + 2]
        at += len(row)
        out.append((p, {n: v / world for n, v in zip(p.names, row)}, row[-2], row[-1]))
    return out


@dataclass
class FitResult:
    step: int                   # the last optimizer step done
    last: dict                  # its logged row (loss NaN when this run did no step)
    batch: dict | None          # the last micro-batch, on the device (the export check's probe)
    stopped: bool               # a stop request or train.stop_at_step ended the loop at a checkpoint


@dataclass
class Trainer:
    step_fn: Callable[[dict, Window], StepResult]  # one micro-batch: runtime.step.train_step over the job's parts
    checkpointer: Checkpointer
    logger: MetricsLogger
    nonfinite: NonFinitePolicy
    flops: Callable[[int, int], float]        # (rows, length) -> this rank's matmul FLOPs of a micro-batch
    hooks: Sequence[Callable[[int], None]] = ()  # after each optimizer step: best-checkpoint selection

    def fit(self, batches: Iterator[dict], start: int, last_step: int) -> FitResult:
        """Optimizer steps start+1..last_step (fewer when stopped). Collective: every rank calls it.

        Per optimizer step the host reads one value (the agreed finite flag, in train_step). Losses and
        tokens stay on the device until a checking step (train.log_every, a save, the last step), where
        one collective reduces them all, rank 0 writes their rows, and the ranks agree on a stop request."""
        step, last, batch, stopped = start, {"loss": float("nan")}, None, False
        window, pending = Window(), []
        tokens, positions, flops, micro_batches = 0, 0, 0.0, 0
        while step < last_step:
            batch = next(batches)
            result = self.step_fn(batch, window)
            micro_batches += 1
            tokens = result.tokens + tokens
            positions += batch["attention_mask"].numel()
            flops += self.flops(*batch["input_ids"].shape)
            if not result.boundary:  # gradient accumulation: the optimizer steps on a later micro-batch
                continue
            if not result.finite:  # the whole step was skipped on every rank: its micro-batches count for nothing
                try:
                    self.nonfinite.skip(step + 1, result, self.logger, micro_batches)
                except NonFiniteLoss:  # every rank ends here (the skip was agreed): the kept rows first
                    self.log(pending)
                    raise
                tokens, positions, flops, micro_batches = 0, 0, 0.0, 0
                continue
            self.nonfinite.reset()
            step += 1
            pending.append(PendingStep.of(step, result, tokens, positions, flops, self.nonfinite.skipped))
            tokens, positions, flops, micro_batches = 0, 0, 0.0, 0
            for hook in self.hooks:
                hook(step)
            checking = self.checking(step, last_step)
            if checking:
                last = self.log(pending)
                pending = []
            if self.checkpointer.after_step(step, check_stop=checking):
                stopped = True
                break
        self.logger.close()
        return FitResult(step, last, batch, stopped)

    def checking(self, step: int, last_step: int) -> bool:
        """Whether `step` reduces the losses, writes the rows and asks about a stop: every
        train.log_every steps, and wherever a checkpoint is saved (a resume must find the rows before it)."""
        return step % self.logger.log_every == 0 or step == last_step or self.checkpointer.saves_at(step)

    def log(self, pending: list[PendingStep]) -> dict:
        """The pending steps' rows, written by rank 0; returns the last one."""
        last = {}
        if not pending:
            return last
        for p, means, tokens, positions in reduce_pending(pending):
            last = {**means, "lr": p.lr}
            if p.skipped:
                last["skipped_nonfinite"] = p.skipped
            last["padding"] = round(1 - tokens / max(positions, 1), 4)  # the padded share of all ranks' positions
            self.logger.step(p.step, last, tokens=int(tokens), flops=p.flops, at=p.at)
        self.logger.flush()
        return last

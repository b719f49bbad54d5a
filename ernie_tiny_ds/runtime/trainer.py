"""The training loop, one for every job: the distillation stages (runtime/loop.py) and teacher
finetuning (workflows/finetune.py).

    until the last step:
        a micro-batch on the device -> step_fn (runtime/step.py: forward, finite check, backward, step)
        a non-finite loss: the job's policy decides (skip the micro-batch, or end the run)
        at the end of an optimizer step: the loss averaged over ranks -> log -> hooks
        -> checkpoint when due -> stop when asked

Every rank runs it in step: the finite check, the mean and the checkpoint are collectives.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Protocol, Sequence

import torch
import torch.distributed as dist

from ..errors import UserError
from .checkpointer import Checkpointer
from .collectives import all_reduce_values
from .metrics import MetricsLogger
from .step import StepResult


class NonFiniteLoss(UserError):
    pass


class NonFinitePolicy(Protocol):
    skipped: int  # micro-batches skipped since the run (re)started

    def skip(self, step: int, result: StepResult, logger: MetricsLogger) -> None:
        """A non-finite loss at `step` (the step being tried): raise to end the run."""

    def reset(self) -> None:
        """A finite loss: the run of non-finite ones in a row is over."""


class SkipNonFinite:
    """The stages': the micro-batch is skipped on every rank, with a warning; `limit` in a row end the run."""

    def __init__(self, limit: int, what: str):
        self.limit, self.what = limit, what
        self.in_a_row = self.skipped = 0

    def skip(self, step: int, result: StepResult, logger: MetricsLogger) -> None:
        self.in_a_row, self.skipped = self.in_a_row + 1, self.skipped + 1
        bad = [n for n, v in result.terms.items() if not torch.isfinite(v)] or ["total"]
        logger.message(f"warning: non-finite loss ({', '.join(bad)}) at step {step}: micro-batch skipped")
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

    def skip(self, step: int, result: StepResult, logger: MetricsLogger) -> None:
        raise NonFiniteLoss(f"{self.what}: non-finite loss at step {step}; {self.hint}")

    def reset(self) -> None:
        pass


def on_device(batches: Iterable[dict[str, torch.Tensor]], dev: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """Every tensor of each batch (labels too) on `dev`, fetched one at a time as the loop asks (the
    loader's saved position is the batches it handed out); pinned host memory copies asynchronously."""
    for batch in batches:
        yield {k: v.to(dev, non_blocking=True) for k, v in batch.items()}


def global_mean(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Loss terms averaged over ranks: the log shows one global loss (a control-plane collective)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    names = sorted(values)
    sums = all_reduce_values([float(values[n].detach().float().reshape(())) for n in names], "sum")
    return {n: v / world for n, v in zip(names, sums)}


@dataclass
class FitResult:
    step: int                   # the last optimizer step done
    last: dict                  # its logged row (loss NaN when this run did no step)
    batch: dict | None          # the last micro-batch, on the device (the export check's probe)
    stopped: bool               # a stop request or train.stop_at_step ended the loop at a checkpoint


@dataclass
class Trainer:
    step_fn: Callable[[dict], StepResult]     # one micro-batch: runtime.step.train_step over the job's parts
    checkpointer: Checkpointer
    logger: MetricsLogger
    nonfinite: NonFinitePolicy
    flops: Callable[[int, int], float]        # (rows, length) -> this rank's matmul FLOPs of a micro-batch
    hooks: Sequence[Callable[[int], None]] = ()  # after each optimizer step: best-checkpoint selection

    def fit(self, batches: Iterator[dict], start: int, last_step: int) -> FitResult:
        """Optimizer steps start+1..last_step (fewer when stopped). Collective: every rank calls it."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        step, last, batch, stopped = start, {"loss": float("nan")}, None, False
        tokens = positions = 0
        flops = 0.0
        while step < last_step:
            batch = next(batches)
            result = self.step_fn(batch)
            if not result.finite:
                self.nonfinite.skip(step + 1, result, self.logger)
                continue
            self.nonfinite.reset()
            tokens += result.tokens
            positions += batch["attention_mask"].numel()
            flops += self.flops(*batch["input_ids"].shape)
            if not result.boundary:  # gradient accumulation: the optimizer steps on a later micro-batch
                continue
            step += 1
            # global_mean reads the loss on the host: the step's device work is done before the logger times it
            last = {**global_mean({"loss": result.total, **result.terms}), "lr": result.lr}
            if self.nonfinite.skipped:
                last["skipped_nonfinite"] = self.nonfinite.skipped
            last["padding"] = round(1 - tokens / max(positions, 1), 4)  # this rank's padded share of the step
            # tokens of all ranks (theirs taken as this rank's), flops of this rank: its device's MFU
            self.logger.step(step, last, tokens=tokens * world, flops=flops)
            tokens, positions, flops = 0, 0, 0.0
            for hook in self.hooks:
                hook(step)
            if self.checkpointer.after_step(step):
                stopped = True
                break
        self.logger.close()
        return FitResult(step, last, batch, stopped)

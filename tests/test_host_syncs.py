"""The step's budget of host reads and control-plane collectives, counted over a real in-process run
of Trainer.fit (a distillation stage's step on tiny models, gradient accumulation over 2, a world of
one over gloo whose collectives run for real): each optimizer step reads one value back from the
device and runs one collective (the finite check); only a checking step (train.log_every, a save)
adds the losses' reduction (one read, one collective) and the stop request's collective."""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_trainer import Loader, stage_job

from ernie_tiny_ds.runtime import checkpoint, collectives
from ernie_tiny_ds.runtime.checkpointer import Checkpointer, SaveSchedule
from ernie_tiny_ds.runtime.metrics import MetricsLogger
from ernie_tiny_ds.runtime.stop import StopRequest
from ernie_tiny_ds.runtime.trainer import SkipNonFinite, Trainer, on_device

RUNTIME = str(Path(collectives.__file__).parent)
READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__")
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_object", "broadcast_object_list", "barrier",
               "reduce_scatter", "all_to_all")


class Counter:
    """Host reads of a tensor made by the training loop's own code (runtime/, but not collectives.py,
    which reads back the host tensor a collective filled) and control-plane collectives."""

    def __init__(self):
        self.reads = self.collectives = 0

    def read(self, original):
        counter = self

        def counted(tensor, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(RUNTIME) and not caller.endswith("collectives.py"):
                counter.reads += 1
            return original(tensor, *args, **kwargs)
        return counted

    def collective(self, original):
        def counted(*args, **kwargs):
            self.collectives += 1
            return original(*args, **kwargs)
        return counted


@pytest.fixture
def world_of_one(monkeypatch):
    # the one-process group stays for the rest of the session, as an in-process command's does
    # (conftest: DeepSpeed keeps the groups it made from it); one made earlier in this process is used
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    assert dist.get_world_size() == 1
    monkeypatch.setattr(collectives, "_active", lambda: True)  # a world of one collects too, as N ranks would
    yield


@pytest.mark.slow  # about 5 s: sixteen micro-batches of two models
def test_each_optimizer_step_reads_the_device_once_and_reduces_only_on_checking_steps(tmp_path, monkeypatch,
                                                                                      world_of_one):
    counter = Counter()
    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counter.read(getattr(torch.Tensor, name)))
    for name in COLLECTIVES:
        monkeypatch.setattr(dist, name, counter.collective(getattr(dist, name)))

    parts, step_fn = stage_job(grad_accum=2)
    loader = Loader()
    run = checkpoint.CheckpointedRun(parts.engine, loader, tmp_path / "checkpoints", "the test job",
                                     checkpoint.RecipeRecord({}))
    checkpointer = Checkpointer(run, SaveSchedule(every=100, last_step=8, keep=1), StopRequest(tmp_path))
    per_step, after_step = {}, checkpointer.after_step

    def counted_after_step(step, *args, **kwargs):  # the last thing of each optimizer step
        stopping = after_step(step, *args, **kwargs)
        per_step[step] = (counter.reads, counter.collectives)
        counter.reads = counter.collectives = 0
        return stopping

    checkpointer.after_step = counted_after_step
    logger = MetricsLogger(tmp_path, 0, 8, 0, "test", progress_bar=False, log_every=4)
    trainer = Trainer(step_fn, checkpointer, logger, SkipNonFinite(limit=2, what="general"),
                      flops=lambda rows, length: 1.0 * rows * length)
    parts.engine.train()
    checkpoint.resume_or_seed(run, rank=0, seed=7)
    counter.reads = counter.collectives = 0
    result = trainer.fit(on_device(loader, torch.device("cpu")), 0, 8)

    assert result.step == 8 and sorted(per_step) == list(range(1, 9))
    for step in (1, 2, 3, 5, 6, 7):  # the finite check: one read, one collective
        assert per_step[step] == (1, 1), (step, per_step)
    # step 4 logs: + the losses' read and reduction, + the stop check; step 8 also saves (not counted here)
    assert per_step[4] == (2, 3), per_step
    # still one row per step, each with its own losses, written by the checking steps
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert len({r["loss"] for r in rows}) == 8 and all(r["loss"] > 0 and r["step_time_s"] > 0 for r in rows)
    assert all(0 < r["padding"] < 1 and r["tokens_per_s"] > 0 for r in rows)

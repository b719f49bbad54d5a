"""The one named step (runtime.step.train_step), the Checkpointer's save/stop decisions, and the
log rows a training engineer reads (step, losses, lr, tokens/s, timings, TFLOP/s, MFU)."""
import contextlib
import random
from types import SimpleNamespace

import pytest
import torch
from distributed import read_metrics, run_cli, tiny_recipe

from ernie_tiny_ds.runtime import checkpointer as checkpointer_module
from ernie_tiny_ds.runtime.checkpoint import CheckpointedRun
from ernie_tiny_ds.runtime.checkpointer import Checkpointer, SaveSchedule
from ernie_tiny_ds.runtime.step import StepParts, train_step


class FakeEngine:
    """The slice of a DeepSpeed engine train_step uses; records the calls."""

    def __init__(self, objective, boundary=True):
        self.objective, self.boundary, self.calls = objective, boundary, []

    def __call__(self, *args):
        self.calls.append("forward")
        return self.objective(*args)

    def get_lr(self):
        return [0.25]

    def is_gradient_accumulation_boundary(self):
        return self.boundary

    def backward(self, loss):
        self.calls.append("backward")
        loss.backward()

    def step(self):
        self.calls.append("step")


class Objective(torch.nn.Module):
    """(total, terms) from a weight, the teacher's output and the labels: enough to see what reached it."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(2.0))
        self.scale, self.seen = scale, None

    def forward(self, input_ids, attention_mask, token_type_ids, teacher, labels):
        self.seen = (teacher, labels)
        term = self.w * input_ids.float().mean() * self.scale
        return term, {"term": term.detach()}


def batch_of(rows, length):
    mask = torch.zeros(rows, length, dtype=torch.long)
    for row in range(rows):
        mask[row, :random.randint(1, length)] = 1
    return {"input_ids": torch.randint(1, 50, (rows, length)) * mask, "attention_mask": mask,
            "token_type_ids": torch.zeros(rows, length, dtype=torch.long), "labels": torch.tensor([1] * rows)}


def test_a_finite_step_runs_forward_backward_step_and_counts_real_tokens():
    objective = Objective()
    engine = FakeEngine(objective)
    batch = batch_of(3, 9)
    result = train_step(StepParts(engine), batch)
    assert engine.calls == ["forward", "backward", "step"]
    assert result.finite and result.boundary and result.lr == 0.25
    assert result.tokens == int(batch["attention_mask"].sum())
    assert not result.total.requires_grad and set(result.terms) == {"term"}
    assert objective.w.grad is not None
    assert objective.seen[0] is None and torch.equal(objective.seen[1], batch["labels"])  # no teacher: None


def test_a_non_finite_step_is_skipped_before_backward():
    engine = FakeEngine(Objective(scale=float("nan")))
    result = train_step(StepParts(engine), batch_of(2, 5))
    assert engine.calls == ["forward"]
    assert not result.finite and result.boundary and not torch.isfinite(result.terms["term"])


def test_mid_accumulation_step_reports_no_boundary():
    engine = FakeEngine(Objective(), boundary=False)
    assert not train_step(StepParts(engine), batch_of(2, 5)).boundary
    assert engine.calls == ["forward", "backward", "step"]


def test_a_teacher_forward_with_capture_feeds_the_objective():
    class Teacher(torch.nn.Module):
        def forward(self, input_ids, attention_mask, token_type_ids):
            assert not torch.is_grad_enabled()  # the teacher runs without autograd
            return SimpleNamespace(logits=input_ids.float())

    capture = SimpleNamespace(recording=lambda: contextlib.nullcontext("features"))
    objective = Objective()
    batch = batch_of(2, 4)
    train_step(StepParts(FakeEngine(objective), Teacher(), capture), batch)
    teacher_out = objective.seen[0]
    assert teacher_out.features == "features" and torch.equal(teacher_out.logits, batch["input_ids"].float())


class Requests:
    def __init__(self, at=()):
        self.at, self.step = set(at), 0

    def requested(self):
        return self.step in self.at


def decisions(monkeypatch, last_step, every, stop_at=None, requests=(), save_last=True):
    saved = []
    monkeypatch.setattr(checkpointer_module.checkpoint, "trainer_state", lambda step, loader: {"step": step})
    monkeypatch.setattr(checkpointer_module.checkpoint, "save",
                        lambda engine, root, step, state, extra_files=None, keep=2, recipe=None: saved.append(step))
    stop = Requests(requests)
    run = CheckpointedRun(None, None, "/nonexistent", "test")
    ckpt = Checkpointer(run, SaveSchedule(every, last_step, keep=2, stop_at_step=stop_at, save_last=save_last), stop)
    stopped = None
    for step in range(1, last_step + 1):
        stop.step = step
        if ckpt.after_step(step):
            stopped = (step, ckpt.requested)
            break
    return saved, stopped


def test_checkpointer_saves_every_n_and_the_last_step(monkeypatch):
    assert decisions(monkeypatch, last_step=7, every=3) == ([3, 6, 7], None)


def test_checkpointer_stops_and_saves_on_request_or_stop_at_step(monkeypatch):
    assert decisions(monkeypatch, last_step=10, every=4, requests=[5]) == ([4, 5], (5, True))
    assert decisions(monkeypatch, last_step=10, every=4, stop_at=8) == ([4, 8], (8, False))


def test_checkpointer_leaves_the_last_step_to_a_final_output(monkeypatch):
    # teacher finetuning: its output replaces the checkpoints, so the last step saves only when stopping
    assert decisions(monkeypatch, last_step=6, every=3, save_last=False) == ([3], None)
    assert decisions(monkeypatch, last_step=6, every=3, save_last=False, requests=[6]) == ([3, 6], (6, True))


@pytest.mark.slow
def test_metrics_rows_and_log_lines_carry_losses_lr_rates_and_mfu(tmp_path, tokenizer_dir, vocab_size):
    recipe = tiny_recipe(tmp_path, tokenizer_dir, vocab_size,
                         train={"max_steps": 4, "save_every": 4, "log_every": 2, "peak_tflops": 0.5})
    proc = run_cli(["distill", "--config", str(recipe), "--stage", "general"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_metrics(tmp_path / "out/general/metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    for row in rows:
        assert {"loss", "hidden", "attention", "embedding", "lr", "tokens_per_s", "elapsed_s", "step_time_s",
                "tflops", "mfu"} <= set(row), row
        assert row["tokens_per_s"] > 0 and row["step_time_s"] > 0 and row["tflops"] > 0
        # tokens/s = this step's real tokens (at most 4 x 32) over its time; mfu against train.peak_tflops
        assert row["tokens_per_s"] * row["step_time_s"] <= 4 * 32 * 1.01
        assert row["mfu"] == pytest.approx(row["tflops"] / 0.5, rel=1e-2, abs=1e-5)
        # the padded share: positions of the step's batch that are not tokens
        assert 0 <= row["padding"] < 1
    assert any(row["padding"] > 0 for row in rows)  # documents of many lengths: some batch pads
    assert [row["elapsed_s"] for row in rows] == sorted(row["elapsed_s"] for row in rows)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("General Distillation step ")]
    assert [line.split()[3] for line in lines] == ["2/4", "4/4"], proc.stdout[-3000:]
    for line in lines:
        for field in ("loss ", "lr ", " tok/s", " s/step", " TFLOP/s", "MFU ", " s elapsed"):
            assert field in line, line

"""One training loop (runtime.trainer.Trainer.fit) drives both kinds of job, in-process on tiny
models: a distillation stage's step (teacher capture, the distillation objective, gradient
accumulation, non-finite micro-batches skipped) and teacher finetuning's (a classifier, a non-finite
loss ends the run). A plain-torch stand-in for the DeepSpeed engine keeps it free of a process group;
the checkpoints are the real ones (runtime.checkpoint), so a stop and a resume are checked against
an uninterrupted run, bit for bit."""
import json
from pathlib import Path

import pytest
import torch
import transformers

from ernie_tiny_ds.config import LossConfig
from ernie_tiny_ds.distill.loss_terms import stage_terms
from ernie_tiny_ds.distill.models import FeatureCapture
from ernie_tiny_ds.distill.objective import ClassifierObjective, DistillationObjective
from ernie_tiny_ds.runtime import checkpoint
from ernie_tiny_ds.runtime.checkpointer import Checkpointer, SaveSchedule
from ernie_tiny_ds.runtime.metrics import MetricsLogger
from ernie_tiny_ds.runtime.step import StepParts, train_step
from ernie_tiny_ds.runtime.stop import StopRequest
from ernie_tiny_ds.runtime.trainer import FailOnNonFinite, NonFiniteLoss, SkipNonFinite, Trainer, on_device
from ernie_tiny_ds.stages import STAGE_SPECS

VOCAB = 120


class TorchEngine:
    """What train_step and the checkpoints ask of a DeepSpeed engine, over a plain torch AdamW: the
    optimizer steps every `grad_accum` micro-batches; the forward passes counted in `poisoned` return NaN."""

    def __init__(self, module, grad_accum=1, poisoned=()):
        self.module, self.grad_accum, self.poisoned = module, grad_accum, set(poisoned)
        self.optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-3)
        self.micro_steps = self.forwards = self.backwards = 0

    def __call__(self, *args):
        self.forwards += 1
        total, terms = self.module(*args)
        if self.forwards in self.poisoned:
            total, terms = total * float("nan"), {k: v * float("nan") for k, v in terms.items()}
        return total, terms

    def get_lr(self):
        return [self.optimizer.param_groups[0]["lr"]]

    def is_gradient_accumulation_boundary(self):
        return (self.micro_steps + 1) % self.grad_accum == 0

    def backward(self, loss):
        self.backwards += 1
        (loss / self.grad_accum).backward()

    def step(self):
        self.micro_steps += 1
        if self.micro_steps % self.grad_accum == 0:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def train(self):
        self.module.train()

    def save_checkpoint(self, root, tag, client_state, save_latest):
        folder = Path(root) / tag
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "micro": self.micro_steps, **client_state}, folder / "mp_rank_00_model_states.pt")

    def load_checkpoint(self, root, tag, load_optimizer_states, load_lr_scheduler_states):
        state = torch.load(Path(root) / tag / "mp_rank_00_model_states.pt", weights_only=False)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.micro_steps = state["micro"]
        return str(root), state


class Loader:
    """Fresh random micro-batches, each a pure function of its position (what a checkpoint keeps)."""

    def __init__(self, rows=3, length=10):
        self.rows, self.length, self.position = rows, length, 0

    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(1000 + self.position)
            self.position += 1
            mask = torch.ones(self.rows, self.length, dtype=torch.long)
            mask[0, torch.randint(2, self.length, (1,), generator=g):] = 0  # one padded row
            yield {"input_ids": torch.randint(1, VOCAB, (self.rows, self.length), generator=g) * mask,
                   "attention_mask": mask, "token_type_ids": torch.zeros_like(mask),
                   "labels": torch.randint(0, 2, (self.rows,), generator=g)}

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def bert(layers, hidden, seed, classifier=False):
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers,
                                  num_attention_heads=4, intermediate_size=2 * hidden, max_position_embeddings=32,
                                  hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0, num_labels=2)
    torch.manual_seed(seed)  # the same weights for the runs compared
    cls = transformers.BertForSequenceClassification if classifier else transformers.BertModel
    return cls._from_config(cfg, attn_implementation="sdpa")


def stage_job(poisoned=(), grad_accum=2):
    """A distillation stage's parts: a frozen teacher with capture hooks, the student's objective."""
    teacher = bert(4, 32, seed=1).eval()
    objective = DistillationObjective(bert(2, 16, seed=2), 32, [2, 4], LossConfig(),
                                      terms=stage_terms(STAGE_SPECS["general"]))
    parts = StepParts(TorchEngine(objective, grad_accum, poisoned), teacher, FeatureCapture(teacher, layers=[2, 4]))
    return parts, (lambda batch, window: train_step(parts, batch, window=window))


def finetune_job(poisoned=()):
    parts = StepParts(TorchEngine(ClassifierObjective(bert(2, 16, seed=3, classifier=True)), 1, poisoned))
    return parts, (lambda batch, window: train_step(parts, batch, window=window))


def fit(tmp_path, parts, step_fn, nonfinite, last_step=6, stop_at=None, seed=7):
    """One run through the loop, resumed from tmp_path's checkpoints when there are some."""
    loader, seen = Loader(), []
    record = checkpoint.RecipeRecord({"optim": {"lr": 1e-3}})
    run = checkpoint.CheckpointedRun(parts.engine, loader, tmp_path / "checkpoints", "the test job", record)
    start = checkpoint.resume_or_seed(run, rank=0, seed=seed)
    checkpointer = Checkpointer(run, SaveSchedule(every=2, last_step=last_step, keep=2, stop_at_step=stop_at),
                                StopRequest(tmp_path))
    logger = MetricsLogger(tmp_path, 0, last_step, start, "test", progress_bar=False, log_every=1)
    trainer = Trainer(step_fn, checkpointer, logger, nonfinite, flops=lambda rows, length: 1.0 * rows * length,
                      hooks=[seen.append])
    parts.engine.train()
    return trainer.fit(on_device(loader, torch.device("cpu")), start, last_step), seen


def rows(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_one_loop_runs_a_stage_and_finetuning_and_a_stopped_run_resumes_exactly(tmp_path):
    # the stage: micro-batch 3 is non-finite, so the optimizer step of micro-batches 3-4 is skipped
    # (with accumulation over 2): 3's NaN gradients are dropped, 4 never reaches backward
    parts, step_fn = stage_job(poisoned={3})
    result, seen = fit(tmp_path / "stage", parts, step_fn, SkipNonFinite(limit=2, what="general"))
    assert result.step == 6 and not result.stopped and seen == [1, 2, 3, 4, 5, 6]
    assert parts.engine.forwards == 14 and parts.engine.backwards == 13 and parts.engine.micro_steps == 14
    assert all(torch.isfinite(p).all() for p in parts.engine.module.parameters())  # no step took a NaN
    logged = rows(tmp_path / "stage")
    assert [r["step"] for r in logged] == seen
    assert {"loss", "embedding", "hidden", "attention", "lr", "padding"} <= set(logged[-1])
    assert "skipped_nonfinite" not in logged[0] and [r["skipped_nonfinite"] for r in logged[1:]] == [1] * 5
    assert set(result.last) <= set(logged[-1]) and result.last["loss"] == pytest.approx(logged[-1]["loss"], rel=1e-5)
    assert result.batch["input_ids"].shape == (3, 10)
    assert sorted(p.name for p in (tmp_path / "stage/checkpoints").glob("step_*")) == ["step_00000004",
                                                                                       "step_00000006"]
    # the run's recipe is kept by every save, without an earlier resume to remember it
    saved = json.loads((tmp_path / "stage/checkpoints/step_00000006/recipe.json").read_text())
    assert saved == {"optim": {"lr": 1e-3}}

    # finetuning: every micro-batch an optimizer step; stopped at step 3, then resumed to 6
    straight, step_fn = finetune_job()
    result, seen = fit(tmp_path / "straight", straight, step_fn, FailOnNonFinite("finetune", "lower finetune.lr"))
    assert (result.step, seen) == (6, [1, 2, 3, 4, 5, 6]) and "hard_label" in rows(tmp_path / "straight")[-1]
    first, step_fn = finetune_job()
    result, seen = fit(tmp_path / "resumed", first, step_fn, FailOnNonFinite("finetune", "x"), stop_at=3)
    assert result.stopped and (result.step, seen) == (3, [1, 2, 3])
    second, step_fn = finetune_job()  # a new process: fresh weights, the checkpoint restores them
    result, seen = fit(tmp_path / "resumed", second, step_fn, FailOnNonFinite("finetune", "x"), seed=99)
    assert (result.step, seen) == (6, [4, 5, 6])
    want, got = straight.engine.module.state_dict(), second.engine.module.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)  # dropout RNG and data position restored too
    assert [r["loss"] for r in rows(tmp_path / "resumed")] == [r["loss"] for r in rows(tmp_path / "straight")]


def test_a_non_finite_loss_is_skipped_up_to_a_limit_in_a_stage_and_fatal_in_finetuning(tmp_path):
    parts, step_fn = stage_job(poisoned={2, 3})
    with pytest.raises(NonFiniteLoss, match=r"^2 consecutive non-finite losses \(term: embedding, hidden, "
                                            r"attention\) at step 1 of general; lower optim.lr"):
        fit(tmp_path / "stage", parts, step_fn, SkipNonFinite(limit=2, what="general"))
    # both optimizer steps tried held a NaN: the optimizer never stepped (micro-batches 1 and 3 reached
    # backward before their step's boundary found the NaN; their gradients were dropped)
    assert not parts.engine.optimizer.state and parts.engine.backwards == 2
    assert all(p.grad is None for p in parts.engine.module.parameters())

    parts, step_fn = finetune_job(poisoned={3})
    with pytest.raises(NonFiniteLoss, match="^finetune: non-finite loss at step 3; lower finetune.lr or check"):
        fit(tmp_path / "finetune", parts, step_fn, FailOnNonFinite("finetune", "lower finetune.lr or check the data"))
    assert parts.engine.micro_steps == 2 and [r["step"] for r in rows(tmp_path / "finetune")] == [1, 2]



def test_a_save_records_the_runs_recipe_with_no_resume_before_it(tmp_path):
    run = checkpoint.CheckpointedRun(TorchEngine(torch.nn.Linear(2, 2)), Loader(), tmp_path / "checkpoints", "job",
                                     checkpoint.RecipeRecord({"train": {"max_steps": 4}}))
    folder = Checkpointer(run, SaveSchedule(every=1, last_step=4, keep=1), StopRequest(tmp_path)).save(2)
    assert json.loads((folder / "recipe.json").read_text()) == {"train": {"max_steps": 4}}
    assert checkpoint.verify(folder) is None and (folder / "trainer_state_rank0.pt").is_file()

"""One distillation stage: build the parts, resume, train (runtime/trainer.py), checkpoint, export."""
from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Recipe
from ..data.corpus import build_general_loader
from ..data.tasks import build_task_loader
from ..data.tokenizer import check_vocab_matches, load_tokenizer, recipe_tokenizer_path
from ..data.workers import Loading
from ..distill.loss_terms import stage_terms, terms_need
from ..distill.models import (
    FeatureCapture,
    build_student,
    count_parameters,
    encoder_up_to,
    load_teacher,
    weights_fingerprint,
)
from ..distill.objective import PROJECTIONS_FILE, DistillationObjective, start_projections
from ..errors import ConfigError
from ..files import atomic_torch_save, atomic_write_text
from ..losses import layer_map
from ..stages import STAGE_SPECS
from . import checkpoint, rank_registry, recipe_changes
from .checkpointer import Checkpointer, SaveSchedule
from .collectives import wait_for_rank0
from .device_defaults import prepare_for_device
from .ds_config import build_ds_config, zero_stage
from .engine_settings import EngineSettings
from .engines import build_training_engine, prepare_teacher
from .export import STUDENT_DIR, export_checkpoint, model_outputs
from .export_check import check_export
from .flops import distill_step_flops, peak_flops
from .metrics import MetricsLogger
from .process_group import device, init_distributed
from .selection import Ranks, best_checkpoint_hook
from .shared_folder import require_shared_folder
from .step import train_step
from .stop import StopRequest
from .trackers import recipe_trackers
from .trainer import SkipNonFinite, Trainer, on_device

DONE_FILE = "stage_done.json"


@dataclass
class StageResult:
    stage: str
    steps: int
    final_loss: float
    student_dir: Path
    complete: bool = True


def make_loader(r: Recipe, spec, tokenizer, rank: int, world: int):
    if spec.data == "general":
        return build_general_loader(r.data, tokenizer, r.train.micro_batch_size, rank, world, r.train.seed,
                                    device=device())
    return build_task_loader(r.task, tokenizer, r.train.micro_batch_size, rank, world, r.train.seed,
                             with_labels=terms_need(stage_terms(spec), "labels"), augmented=spec.augmented_data,
                             loading=Loading.for_device(r.data.num_workers, device()))


def engine_student_outputs(engine, student, batch: dict, stage: int) -> torch.Tensor:
    """The trained student's outputs on `batch`, dropout off (collective under ZeRO-3: params gathered)."""
    import deepspeed  # not at the top: the CLI's parsing imports this module (see process_group.init_distributed)

    gather = deepspeed.zero.GatheredParameters(list(student.parameters())) if stage == 3 else contextlib.nullcontext()
    engine.module.eval()
    with gather, torch.no_grad():
        out = model_outputs(student, batch)
    engine.module.train()
    return out.float()


def check_heads(student_cfg, teacher_cfg, relation_heads) -> None:
    if relation_heads is None and student_cfg.num_attention_heads != teacher_cfg.num_attention_heads:
        raise ConfigError(f"student.num_attention_heads ({student_cfg.num_attention_heads}) differs from the teacher's "
                          f"({teacher_cfg.num_attention_heads}): set losses.relation_heads to transfer attention")
    if relation_heads is not None:
        for who, cfg in (("student", student_cfg), ("teacher", teacher_cfg)):
            if cfg.hidden_size % relation_heads:
                raise ConfigError(f"losses.relation_heads ({relation_heads}) must divide the {who} hidden size "
                                  f"({cfg.hidden_size})")


@dataclass
class StageParts:
    """Everything one stage trains with, built once per run."""
    tokenizer: object
    teacher: torch.nn.Module           # replicated module or ZeRO-3 inference engine
    teacher_capture: FeatureCapture
    student: torch.nn.Module
    objective: DistillationObjective
    engine: object                     # DeepSpeed engine over the objective
    ds_config: dict
    loader: object
    mapping: list[int]
    provenance: dict                   # what the stage started from (written to stage_done.json)


@dataclass
class Trainable:
    """The student side of a stage: what one teacher's features train (runtime/shared_teacher.py builds
    several on one teacher)."""
    student: torch.nn.Module
    objective: DistillationObjective
    engine: object
    ds_config: dict
    mapping: list[int]
    provenance: dict


def build_trainable(r: Recipe, spec, teacher_config, world: int) -> Trainable:
    """The seeded student, its objective and engine, and what the stage started from."""
    num_labels = teacher_config.num_labels if spec.task_head else None
    student = build_student(r.student, teacher_config, seed=r.train.seed, num_labels=num_labels)
    check_heads(student.config, teacher_config, r.losses.relation_heads)
    provenance = {
        "teacher": (r.teacher.finetuned_path if spec.finetuned_teacher else r.teacher.path) or "inline config",
        "teacher_finetuned": spec.finetuned_teacher,
        "student_init": r.student.path or "fresh",
        "student_init_fingerprint": weights_fingerprint(student),
        "recipe": recipe_changes.fingerprint(r, spec.name),  # a resume or a pipeline skip names what changed
    }
    try:
        mapping = layer_map(teacher_config.num_hidden_layers, student.config.num_hidden_layers, r.losses.layer_map)
    except ValueError as exc:
        raise ConfigError(f"losses.layer_map: {exc}") from None
    objective = DistillationObjective(student, teacher_config.hidden_size, mapping, r.losses, terms=stage_terms(spec))
    provenance.update(start_projections(objective, r.student.path, r.student.projections, r.losses.carry_projections))
    settings = EngineSettings.of_stage(r)
    ds_config = build_ds_config(r.deepspeed, settings, world)
    engine = build_training_engine(objective, settings, ds_config)
    provenance["loss_terms"] = sorted(objective.weights())
    return Trainable(student, objective, engine, ds_config, mapping, provenance)


def ready_teacher(teacher, r: Recipe, spec, layers: list[int]):
    """The frozen teacher as the stage runs it (only as deep as `layers` when the stage reads no
    logits), and its capture of `layers`."""
    if spec.teacher_depth == "mapped_layers":  # no logits read: the teacher runs only as deep as the layer map reads
        teacher = encoder_up_to(teacher, max(layers))
    teacher_capture = FeatureCapture(teacher, layers=layers)
    return prepare_teacher(teacher, r, r.train.micro_batch_size), teacher_capture


def stage_teacher(r: Recipe, spec):
    """The stage's tokenizer and its unprepared teacher, checked against each other."""
    tokenizer_dir = recipe_tokenizer_path(r)
    tokenizer = load_tokenizer(tokenizer_dir)
    teacher = load_teacher(r.teacher, finetuned=spec.finetuned_teacher, seed=r.train.seed)
    check_vocab_matches(tokenizer, teacher.config, tokenizer_dir)
    return tokenizer, teacher


def build_parts(r: Recipe, spec, rank: int, world: int) -> StageParts:
    tokenizer, teacher = stage_teacher(r, spec)
    side = build_trainable(r, spec, teacher.config, world)
    teacher, teacher_capture = ready_teacher(teacher, r, spec, side.mapping)
    loader = make_loader(r, spec, tokenizer, rank, world)
    student = side.student
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in student.parameters())
    t_local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in teacher.parameters())
    print(f"[rank {rank}] pid {os.getpid()} {spec.title}: ZeRO-{zero_stage(side.ds_config)}, this rank holds {local} "
          f"of {count_parameters(student)} student parameters and {t_local} of {count_parameters(teacher)} teacher "
          f"parameters; teacher layers {side.mapping}", flush=True)
    return StageParts(tokenizer, teacher, teacher_capture, student, side.objective, side.engine, side.ds_config,
                      loader, side.mapping, side.provenance)


def run_stage(recipe: Recipe, stage: str) -> StageResult:
    r = recipe.for_stage(stage)
    spec = STAGE_SPECS[stage]
    rank, world = init_distributed(r.train.dist_timeout_s, r.train.dist_backend)
    out_dir = Path(r.output_dir) / stage
    require_shared_folder(Path(r.output_dir), rank, world)  # before any work: checkpoints need one folder for all
    rank_registry.register(out_dir / ".ranks", rank, world)  # lets a survivor name a rank that dies
    dev = device()
    r = prepare_for_device(r, dev)  # the `auto` keys for this device: everything below reads them resolved
    parts = build_parts(r, spec, rank, world)

    # --- resume from the newest intact checkpoint
    run = checkpoint.CheckpointedRun(parts.engine, parts.loader, out_dir / "checkpoints", what=stage,
                                     recipe=checkpoint.RecipeRecord(parts.provenance["recipe"]))
    step = checkpoint.resume_or_seed(run, rank, r.train.seed)
    schedule = SaveSchedule(r.train.save_every, r.train.max_steps, r.train.keep_checkpoints,
                            stop_at_step=r.train.stop_at_step)
    checkpointer = Checkpointer(run, schedule, StopRequest(r.output_dir),
                                extra_files=lambda f: save_student_files(parts, f))
    selector = best_checkpoint_hook(r, spec, parts, out_dir, Ranks(rank, world, dev, zero_stage(parts.ds_config)))

    peak = peak_flops(dev, r.train.precision, r.train.peak_tflops) if rank == 0 else None  # only rank 0 logs
    logger = MetricsLogger(out_dir, rank, r.train.max_steps, step, spec.title, r.train.progress_bar, r.train.log_every,
                           peak_flops=peak, trackers=recipe_trackers(r))
    trainer = Trainer(lambda batch, window: train_step(parts, batch, window=window), checkpointer, logger,
                      SkipNonFinite(r.train.max_nonfinite_steps, stage),
                      flops=lambda rows, length: distill_step_flops(parts, rows, length),
                      hooks=[selector] if selector is not None else [])
    fit = trainer.fit(on_device(parts.loader, dev), step, r.train.max_steps)

    if fit.step < r.train.max_steps:
        if rank == 0:
            why = "stop requested (STOP file or SIGUSR1)" if checkpointer.requested else "train.stop_at_step"
            checkpointer.stop_request.clear()
            print(f"{spec.title}: stopped at step {fit.step} of {r.train.max_steps} ({why}); checkpoint saved; "
                  f"run the same command again to continue", flush=True)
        return StageResult(stage, fit.step, fit.last["loss"], out_dir / "student", complete=False)
    checkpointer.ensure_saved(fit.step)
    final_loss = finish_stage(r, spec, parts, out_dir, fit.step, fit.last["loss"], fit.batch, rank, world)
    return StageResult(stage, fit.step, final_loss, out_dir / "student")


def save_student_files(parts: StageParts, folder: Path) -> None:
    """Config + tokenizer beside the weights, so one checkpoint folder is enough to export."""
    hf = folder / STUDENT_DIR
    parts.student.config.architectures = [type(parts.student).__name__]
    parts.student.config.save_pretrained(hf)
    parts.tokenizer.save_pretrained(hf)


def finish_stage(r: Recipe, spec, parts: StageParts, out_dir: Path, step: int, final_loss: float,
                 batch: dict | None, rank: int, world: int) -> float:
    """Export the final checkpoint (rank 0), check the export against the live engine, mark the stage done."""
    student_dir = out_dir / "student"
    probe_batch = {k: v[:2] for k, v in batch.items()} if batch is not None else None
    probe = engine_student_outputs(parts.engine, parts.student, probe_batch, zero_stage(parts.ds_config)) \
        if probe_batch is not None else None
    done_file = out_dir / DONE_FILE
    if math.isnan(final_loss) and done_file.is_file():  # a re-run of a finished stage trains no step
        final_loss = json.loads(done_file.read_text()).get("final_loss") or float("nan")
    if rank == 0:
        export_checkpoint(out_dir / "checkpoints" / checkpoint.tag_for(step), student_dir,
                          projections=out_dir / PROJECTIONS_FILE)  # the next stage starts from them
        done = {"stage": spec.name, "steps": step, "final_loss": final_loss, "student": str(student_dir),
                **parts.provenance}
        if probe is not None:
            # the export must reproduce the engine's student; keep the probe so anyone can re-check it
            atomic_torch_save({"batch": {k: v.cpu() for k, v in probe_batch.items()}, "outputs": probe.cpu()},
                              out_dir / "export_probe.pt")
            done.update(check_export(student_dir, probe_batch, probe, r.train.precision))
        atomic_write_text(done_file, json.dumps(done))
        print(f"{spec.title} done: {step} steps, final loss {final_loss:.6g}; student exported to {student_dir}",
              flush=True)
    wait_for_rank0()  # the export and its checks can outlast train.dist_timeout_s
    parts.engine.destroy()
    return final_loss

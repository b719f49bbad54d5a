"""The DeepSpeed engines: the student's training engine (its optimizer groups and learning-rate schedule)
and the frozen teacher.

The student (with its projections) is a DeepSpeed training engine under ZeRO 0-3. The frozen
teacher is either replicated on every rank in the inference dtype (default: BERT-base fits on one
GPU, so sharding it only adds communication) or a ZeRO-3 inference engine (large teachers).
"""
from __future__ import annotations

import argparse

import torch

from ..config import Recipe
from . import safe_load
from .ds_config import fill_auto, read_ds_config
from .engine_settings import EngineSettings
from .process_group import device, device_index

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def warmup_linear_decay(total_steps: int, warmup_ratio: float):
    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))
    return factor


def parameter_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases and LayerNorm gains/shifts (the 1-D parameters) get
    none, as in BERT's and TinyBERT's recipes. Empty groups are left out."""
    def is_matrix(p: torch.nn.Parameter) -> bool:
        return len(getattr(p, "ds_shape", p.shape)) >= 2  # ds_shape: the full shape of a ZeRO-3 shard

    decay = [p for p in module.parameters() if p.requires_grad and is_matrix(p)]
    no_decay = [p for p in module.parameters() if p.requires_grad and not is_matrix(p)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def engine_args() -> argparse.Namespace:
    """DeepSpeed places an engine on cuda:LOCAL_RANK unless told otherwise; ranks that share a GPU
    (gloo backend) all sit on device_index()."""
    return argparse.Namespace(device_rank=device_index())


def build_training_engine(module: torch.nn.Module, settings: EngineSettings, ds_config: dict):
    """DeepSpeed training engine over an objective module, with warm-up + linear decay: the student
    and its projections (distillation stages) or the teacher's classifier (teacher finetuning)."""
    import deepspeed  # not at the top: see process_group.init_distributed

    if settings.precision not in DTYPES:  # "auto" here would build a JSON with neither bf16 nor fp16 on,
        # which trains in fp32 without a word
        raise ValueError(f"train.precision {settings.precision!r} reached the engine unresolved: "
                         "runtime/device_defaults.prepare_for_device resolves it for the device first")

    def scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_linear_decay(settings.total_steps, settings.warmup_ratio))

    groups = parameter_groups(module, settings.weight_decay)
    engine, _, _, _ = deepspeed.initialize(args=engine_args(), model=module, model_parameters=groups,
                                           config=ds_config, lr_scheduler=scheduler)
    safe_load.install_on_engine(engine)
    return engine


def teacher_dtype(recipe: Recipe) -> torch.dtype:
    """The frozen teacher's precision: `teacher.dtype`, or for auto the training precision (a bf16 teacher
    cost the demo's student more accuracy than it allows, BENCHMARKS.md section 6: bf16 is asked for, never picked)."""
    return DTYPES[recipe.train.precision if recipe.teacher.dtype == "auto" else recipe.teacher.dtype]


def prepare_teacher(teacher: torch.nn.Module, recipe: Recipe, micro_batch_size: int) -> torch.nn.Module:
    """Replicated teacher on this rank's device, or a ZeRO-3 sharded inference engine."""
    dtype = teacher_dtype(recipe)
    if not recipe.teacher.zero3:
        return teacher.to(device=device(), dtype=dtype)
    import deepspeed  # not at the top: see process_group.init_distributed

    config = read_ds_config("teacher_zero3_inference")
    config = fill_auto(config, {"train_micro_batch_size_per_gpu": micro_batch_size,
                                 "bf16.enabled": dtype == torch.bfloat16, "fp16.enabled": dtype == torch.float16})
    engine, _, _, _ = deepspeed.initialize(args=engine_args(), model=teacher, config=config)
    engine.eval()
    return engine

"""What the DeepSpeed engine trains with: the batch per rank, the precision, the optimizer and its
schedule. A distillation stage takes them from its recipe (train + optim); teacher finetuning from
the recipe's finetune section. runtime/ds_config.py builds the DeepSpeed JSON from them, runtime/engines.py the engine.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineSettings:
    micro_batch_size: int          # per rank
    grad_accum: int
    precision: str                 # fp32, bf16 or fp16
    lr: float                      # peak rate: linear warm-up, then linear decay to 0 at total_steps
    weight_decay: float            # on matrices only (engine.parameter_groups)
    warmup_ratio: float
    total_steps: int
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    grad_clip: float = 1.0

    @classmethod
    def of_stage(cls, recipe) -> EngineSettings:
        """A distillation stage's settings: `recipe` is the stage's effective recipe (Recipe.for_stage)."""
        t, o = recipe.train, recipe.optim
        return cls(micro_batch_size=t.micro_batch_size, grad_accum=t.grad_accum, precision=t.precision, lr=o.lr,
                   weight_decay=o.weight_decay, warmup_ratio=o.warmup_ratio, total_steps=t.max_steps,
                   betas=tuple(o.betas), eps=o.eps, grad_clip=o.grad_clip)

"""What the recipe's `auto` keys mean on the device a run trains on, and the matmul settings that go with it.

Each training entry point (a stage, teacher finetuning, the pipeline) calls prepare_for_device right
after joining the process group, so everything downstream (the DeepSpeed JSON's bf16/fp16, the teacher's
dtype, the peak FLOP/s for MFU, the export check, the loaders, the fingerprint a resume compares) reads
the resolved values. The fingerprint records what the run trained with, not the word `auto`: a resume on
a device where auto means the same is accepted, one where it means another precision is refused.

- train.precision auto: bf16 on a CUDA device with native bf16 (compute capability 8.0, Ampere, or
  newer), else fp32: a CPU (the CPU ranks of this project train in fp32; a bf16 teacher is asked for
  with teacher.dtype, BENCHMARKS.md section 6) and older GPUs, whose fast path, fp16, needs loss
  scaling and can overflow, so it is asked for, never picked.
- data.num_workers auto: data/workers.py.
- TF32: on a CUDA device of capability 8.0 or newer, fp32 matrix products (the fp32 master copy's side
  computations, a teacher kept in fp32) run on TF32 tensor cores unless train.precision is fp32, which
  keeps IEEE fp32 products: a recipe that names fp32 on a GPU asks for fp32 numerics.
"""
from __future__ import annotations

import torch

from ..config import Recipe
from ..data.workers import default_num_workers

AMPERE = (8, 0)  # native bf16 and TF32 tensor cores


def _is_ampere_or_newer(device) -> bool:
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= AMPERE


def default_precision(device) -> str:
    """What train.precision auto means on `device`: bf16 where the GPU computes it natively, else fp32."""
    if not _is_ampere_or_newer(device):
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp32"


def device_defaults(device) -> dict:
    """Every recipe `auto` key that depends on the device (config.recipe.AUTO_KEYS), resolved for `device`."""
    return {"train.precision": default_precision(device), "data.num_workers": default_num_workers(device)}


def uses_tf32(precision: str, device) -> bool:
    """fp32 matrix products on TF32 tensor cores: Ampere or newer, unless the recipe asked for fp32."""
    return precision != "fp32" and _is_ampere_or_newer(device)


def prepare_for_device(recipe: Recipe, device) -> Recipe:
    """The recipe with its `auto` keys resolved for `device`, and this process's fp32 matmul precision
    set to go with it (CUDA only: a CPU's products are left as torch has them)."""
    resolved = recipe.on_device(device_defaults(device))
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = uses_tf32(resolved.train.precision, device)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    return resolved

"""teacher.dtype: auto is the training precision on every device; an explicit dtype is what the teacher runs in."""
from __future__ import annotations

import pytest
import torch

from ernie_tiny_ds.config import load_recipe
from ernie_tiny_ds.runtime import engines

EXPECTED = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # written out, not engines.DTYPES


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_auto_is_the_training_precision(precision):
    recipe = load_recipe(None, ["teacher.config={hidden_size: 32}", f"train.precision={precision}"])
    assert recipe.teacher.dtype == "auto"
    assert engines.teacher_dtype(recipe) == EXPECTED[precision]


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_an_explicit_teacher_dtype_wins(dtype):
    recipe = load_recipe(None, ["teacher.config={hidden_size: 32}", f"teacher.dtype={dtype}", "train.precision=fp32"])
    assert engines.teacher_dtype(recipe) == EXPECTED[dtype]


def test_prepare_teacher_casts_only_the_teacher(monkeypatch):
    recipe = load_recipe(None, ["teacher.config={hidden_size: 32}", "train.precision=fp32", "teacher.dtype=bf16"])
    monkeypatch.setattr(engines, "device", lambda: torch.device("cpu"))
    teacher, student = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    assert engines.prepare_teacher(teacher, recipe, 2).weight.dtype == torch.bfloat16
    assert student.weight.dtype == torch.float32

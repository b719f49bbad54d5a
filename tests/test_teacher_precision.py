"""teacher.dtype: auto is the training precision; with teacher_precision.AUTO_BF16_TEACHER on (off since the demo's
retained share moved 5.8 points, BENCHMARKS.md §6) it is bf16 where the hardware computes bf16 natively."""
from __future__ import annotations

import pytest
import torch

from ernie_tiny_ds.config import load_recipe
from ernie_tiny_ds.runtime import engines, teacher_precision

FLAGS = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f {extra}\nbugs\t\t:\n"


@pytest.mark.parametrize("extra,native", [("avx512_bf16", True), ("amx_bf16 amx_tile", True),
                                          ("avx512_vnni", False), ("", False)])
def test_cpu_flags_decide(tmp_path, extra, native):
    info = tmp_path / "cpuinfo"
    info.write_text(FLAGS.format(extra=extra))
    assert teacher_precision.cpu_computes_bf16(str(info)) is native


def test_without_cpuinfo_torch_is_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert teacher_precision.cpu_computes_bf16(str(tmp_path / "missing")) is True
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert teacher_precision.cpu_computes_bf16(str(tmp_path / "missing")) is False


@pytest.mark.parametrize("capability,native", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_cuda_needs_compute_capability_8(monkeypatch, capability, native):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev=None: capability)
    assert teacher_precision.native_bf16(torch.device("cuda", 0)) is native


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_auto_is_the_training_precision_by_default(monkeypatch, precision):
    recipe = load_recipe(None, ["teacher.config={hidden_size: 32}", f"train.precision={precision}"])
    assert recipe.teacher.dtype == "auto" and teacher_precision.AUTO_BF16_TEACHER is False
    monkeypatch.setattr(teacher_precision, "cpu_computes_bf16", lambda: True)
    assert teacher_precision.teacher_dtype(recipe, torch.device("cpu")) == teacher_precision.DTYPES[precision]


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_auto_bf16_is_bf16_on_native_hardware_else_the_training_precision(monkeypatch, precision):
    recipe = load_recipe(None, ["teacher.config={hidden_size: 32}", f"train.precision={precision}"])
    monkeypatch.setattr(teacher_precision, "AUTO_BF16_TEACHER", True)
    monkeypatch.setattr(teacher_precision, "cpu_computes_bf16", lambda: True)
    assert teacher_precision.teacher_dtype(recipe, torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(teacher_precision, "cpu_computes_bf16", lambda: False)
    assert teacher_precision.teacher_dtype(recipe, torch.device("cpu")) == teacher_precision.DTYPES[precision]


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_an_explicit_teacher_dtype_wins(monkeypatch, dtype):
    recipe = load_recipe(None, ["teacher.config={hidden_size: 32}", f"teacher.dtype={dtype}"])
    for native in (True, False):
        monkeypatch.setattr(teacher_precision, "cpu_computes_bf16", lambda: native)
        assert teacher_precision.teacher_dtype(recipe, torch.device("cpu")) == teacher_precision.DTYPES[dtype]


def test_prepare_teacher_casts_only_the_teacher(monkeypatch):
    recipe = load_recipe(None, ["teacher.config={hidden_size: 32}", "train.precision=fp32"])
    monkeypatch.setattr(engines, "device", lambda: torch.device("cpu"))
    monkeypatch.setattr(teacher_precision, "AUTO_BF16_TEACHER", True)
    monkeypatch.setattr(teacher_precision, "cpu_computes_bf16", lambda: True)
    teacher, student = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    assert engines.prepare_teacher(teacher, recipe, 2).weight.dtype == torch.bfloat16
    assert student.weight.dtype == torch.float32

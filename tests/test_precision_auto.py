"""train.precision: auto (the default): bf16 on a CUDA device of compute capability 8.0 or newer, fp32 on a
CPU and on older GPUs, with TF32 for fp32 matrix products on Ampere and newer unless the recipe names
fp32. The device is emulated (torch.cuda's capability and bf16 answers); what is checked is that the
resolved value is what everything downstream reads (the DeepSpeed JSON, the teacher's dtype, the peak
FLOP/s, the export check's bound, the fingerprint a resume compares), that the bundled recipes use auto
where they named a GPU precision while the demo stays fp32, that the ZeRO JSONs take DeepSpeed's
recommended values, and, in one real CPU run in this process, that a run recorded with auto resumes
under the equivalent explicit values and refuses another precision.

The GPU facts (auto is bf16 and TF32 is on, a real ZeRO-3 step with the new threshold) are tests/test_gpu.py's."""
from __future__ import annotations

import json
import re

import pytest
import torch
from distributed import tiny_recipe
from test_hostile_input import one_line_exit_2

from ernie_tiny_ds.config import load_recipe
from ernie_tiny_ds.errors import ConfigError
from ernie_tiny_ds.runtime import device_defaults, export_check, recipe_changes
from ernie_tiny_ds.runtime.device_defaults import default_precision, prepare_for_device
from ernie_tiny_ds.runtime.ds_config import build_ds_config
from ernie_tiny_ds.runtime.engine_settings import EngineSettings
from ernie_tiny_ds.runtime.engines import teacher_dtype
from ernie_tiny_ds.runtime.flops import table_peak_flops

CUDA = torch.device("cuda", 0)
BASE = ["teacher.config={}"]


@pytest.fixture
def gpu(monkeypatch):
    """`gpu(capability)`: this process sees a CUDA GPU of that compute capability (bf16 from 8.0 on)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32  # torch's own: restored after
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True

    def emulate(capability: tuple[int, int]) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: capability >= (8, 0))
    yield emulate
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_auto_is_the_default_and_resolves_per_device(gpu):
    assert load_recipe(None, BASE).train.precision == "auto"
    assert default_precision("cpu") == "fp32"
    for capability, expected in (((7, 0), "fp32"), ((7, 5), "fp32"), ((8, 0), "bf16"), ((8, 9), "bf16"),
                                 ((9, 0), "bf16"), ((10, 0), "bf16")):
        gpu(capability)
        assert default_precision(CUDA) == expected, capability
        assert default_precision("cpu") == "fp32"


@pytest.mark.parametrize("where,written,expected_cpu,expected_gpu", [
    ("default", [], "fp32", "bf16"),
    ("explicit auto", ["train.precision=auto"], "fp32", "bf16"),
    ("explicit fp32", ["train.precision=fp32"], "fp32", "fp32"),
    ("explicit fp16", ["train.precision=fp16"], "fp16", "fp16"),
    ("a stage's own auto", ["train.precision=fp16", "stages.general.train.precision=auto"], "fp32", "bf16"),
])
def test_everything_downstream_reads_the_resolved_precision(gpu, where, written, expected_cpu, expected_gpu):
    recipe = load_recipe(None, BASE + written)
    for device, expected in (("cpu", expected_cpu), (CUDA, expected_gpu)):
        if device == CUDA:
            gpu((9, 0))
        stage = prepare_for_device(recipe, device).for_stage("general")
        assert stage.train.precision == expected, (where, device)
        settings = EngineSettings.of_stage(stage)
        assert settings.precision == expected
        ds = build_ds_config(stage.deepspeed, settings, world_size=2)
        assert (ds["bf16"]["enabled"], ds["fp16"]["enabled"]) == (expected == "bf16", expected == "fp16")
        assert teacher_dtype(stage) == {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[expected]
        assert table_peak_flops("NVIDIA H100 80GB HBM3", stage.train.precision) == \
            table_peak_flops("NVIDIA H100 80GB HBM3", "fp32" if expected == "fp32" else "bf16")
        assert stage.train.precision in export_check.EPSILON and stage.train.precision in export_check.ROUNDING_RUN
        assert recipe_changes.fingerprint(stage, "general")["train"]["precision"] == expected


def test_a_resume_compares_resolved_values(gpu):
    """Recorded with auto, or with the explicit value auto resolves to (a run of the old defaults: fp32,
    no workers), the fingerprints match; on a device where auto means another precision, the change is
    refused naming the key."""
    auto = load_recipe(None, BASE)
    old_defaults = load_recipe(None, BASE + ["train.precision=fp32", "data.num_workers=0"])
    on_cpu = recipe_changes.fingerprint(prepare_for_device(auto, "cpu"), "general")
    assert on_cpu["train"]["precision"] == "fp32" and on_cpu["data"]["num_workers"] == 0
    assert recipe_changes.check(recipe_changes.fingerprint(old_defaults, "general"), on_cpu,
                                recipe_changes.SAFE_ON_RESUME, "resume", "r") == []
    gpu((8, 0))
    on_gpu = recipe_changes.fingerprint(prepare_for_device(auto, CUDA), "general")
    bf16 = load_recipe(None, BASE + ["train.precision=bf16", "data.num_workers=auto"])
    assert recipe_changes.check(recipe_changes.fingerprint(prepare_for_device(bf16, CUDA), "general"), on_gpu,
                                recipe_changes.SAFE_ON_SKIP, "skip", "r") == []
    with pytest.raises(ConfigError, match=r"resume: .*train.precision \('fp32' -> 'bf16'\)"):
        recipe_changes.check(on_cpu, on_gpu, recipe_changes.SAFE_ON_RESUME, "resume", "r")


def test_tf32_is_set_for_fp32_products_on_ampere_unless_the_recipe_names_fp32(gpu):
    auto, fp32 = load_recipe(None, BASE), load_recipe(None, BASE + ["train.precision=fp32"])
    prepare_for_device(auto, "cpu")
    assert torch.backends.cuda.matmul.allow_tf32 is False  # a CPU run leaves torch's settings alone
    gpu((7, 0))
    prepare_for_device(auto, CUDA)
    assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False
    gpu((8, 0))
    prepare_for_device(auto, CUDA)
    assert torch.backends.cuda.matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32 is True
    prepare_for_device(fp32, CUDA)  # IEEE fp32 products, as the recipe asks
    assert torch.backends.cuda.matmul.allow_tf32 is False
    assert device_defaults.uses_tf32("fp16", CUDA) and not device_defaults.uses_tf32("fp16", "cpu")


def test_bundled_recipes_use_auto_and_the_demo_stays_fp32(gpu):
    for name, given in (("ernie_tiny_en", BASE), ("ernie_tiny_zh", [])):  # zh names its teacher
        recipe = load_recipe(name, given)
        assert (recipe.train.precision, recipe.teacher.dtype, recipe.data.num_workers) == ("auto",) * 3, name
        gpu((8, 0))
        assert teacher_dtype(prepare_for_device(recipe, CUDA)) == torch.bfloat16  # as the recipes had it
        assert teacher_dtype(prepare_for_device(recipe, "cpu")) == torch.float32
    demo = load_recipe("demo", BASE)
    on_cpu = prepare_for_device(demo, "cpu")
    assert (on_cpu.train.precision, on_cpu.data.num_workers, teacher_dtype(on_cpu)) == ("fp32", 0, torch.float32)
    assert prepare_for_device(demo, CUDA).train.precision == "fp32"  # fp32 on every device, as before


@pytest.mark.parametrize("zero", ["zero2", "zero3", "zero3_offload"])
def test_zero_configs_take_deepspeeds_recommended_values(zero):
    """overlap_comm on (the gradient reduction overlaps the backward pass on a side CUDA stream; on a
    CPU it changes nothing, BENCHMARKS.md section 10), ZeRO-3's persistence threshold at DeepSpeed's
    default 1e5 (small tensors stay gathered); deepspeed.overrides still sets either."""
    settings = EngineSettings(micro_batch_size=4, grad_accum=1, precision="fp32", lr=1e-3, weight_decay=0.0,
                              warmup_ratio=0.0, total_steps=10)
    built = build_ds_config(load_recipe(None, BASE + [f"deepspeed.config={zero}"]).deepspeed, settings, 2)
    assert built["zero_optimization"]["overlap_comm"] is True
    if zero != "zero2":
        assert built["zero_optimization"]["stage3_param_persistence_threshold"] == 100_000
    kept = load_recipe(None, BASE + [f"deepspeed.config={zero}",
                                     "deepspeed.overrides.zero_optimization.overlap_comm=false"])
    assert build_ds_config(kept.deepspeed, settings, 2)["zero_optimization"]["overlap_comm"] is False


@pytest.mark.slow
def test_a_cpu_run_records_the_resolved_values_and_resumes_under_them(tmp_path, tokenizer_dir, vocab_size,
                                                                      in_process):
    """In this process: a stage written with auto stops at step 1; its checkpoint records fp32 and no
    workers; the same stage with bf16 is refused, with the explicit fp32 and 0 it resumes and finishes."""
    recipe = tiny_recipe(tmp_path, tokenizer_dir, vocab_size, train={"max_steps": 2, "save_every": 1})
    args = ["distill", "--config", str(recipe), "--stage", "general"]
    code, lines = in_process([*args, "train.precision=auto", "data.num_workers=auto", "train.stop_at_step=1"])
    assert code == 0, lines
    ckpt = tmp_path / "out/general/checkpoints/step_00000001"
    recorded = json.loads((ckpt / "recipe.json").read_text())
    assert (recorded["train"]["precision"], recorded["data"]["num_workers"]) == ("fp32", 0)
    error = one_line_exit_2(in_process([*args, "train.precision=bf16"]))[0]
    assert re.search(r"train.precision \('fp32' -> 'bf16'\)", error), error
    code, lines = in_process([*args, "train.precision=fp32", "data.num_workers=0"])
    assert code == 0, lines
    done = json.loads((tmp_path / "out/general/stage_done.json").read_text())
    assert done["steps"] == 2 and done["recipe"]["train"]["precision"] == "fp32"

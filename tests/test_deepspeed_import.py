"""`import deepspeed` on a GPU node without a CUDA toolkit (pip-only CUDA: the runtime, no nvcc).

DeepSpeed up to 0.19.4 probes every op builder when it is imported; the FP-quantizer's probe asks
nvcc for its version whenever a GPU is visible, and raises (MissingCUDAException without CUDA_HOME,
FileNotFoundError with a runtime-only CUDA_HOME) so the import itself fails. 0.19.5 made the probe
lazy and treats a failing one as "not compatible"; setup.cfg requires it. The test builds that node
on this CPU machine: a process whose torch says a Hopper GPU is there and whose CUDA_HOME is unset.
"""
from __future__ import annotations

import configparser
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent
SAFE = Version("0.19.5")

# what a GPU node with pip-only CUDA looks like to the Python code that probes it
FAKE_GPU_NODE = textwrap.dedent("""
    import torch, torch.utils.cpp_extension as ext
    torch.cuda.is_available = lambda: True
    torch.cuda.device_count = lambda: 1
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
    class _Props:
        major, minor, name, total_memory = 9, 0, "fake H100", 80 << 30
    torch.cuda.get_device_properties = lambda *a, **k: _Props()
    torch.version.cuda = "13.0"
    ext.CUDA_HOME = None
""")


def test_setup_cfg_requires_a_deepspeed_whose_import_does_not_need_nvcc():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    requirements = [Requirement(line) for line in cfg["options"]["install_requires"].split("\n")
                    if line.strip() and not line.strip().startswith("#")]
    deepspeed = next(r for r in requirements if r.name == "deepspeed")
    assert not deepspeed.specifier.contains("0.19.4"), deepspeed
    assert deepspeed.specifier.contains(str(SAFE)), deepspeed


@pytest.mark.slow
def test_deepspeed_imports_and_probes_ops_on_a_gpu_node_without_nvcc(tmp_path):
    script = FAKE_GPU_NODE + textwrap.dedent("""
        import deepspeed
        ops = deepspeed.ops.__compatible_ops__   # what init_distributed's shm probe reads
        assert ops["fp_quantizer"] is False, ops  # needs nvcc: not compatible, and no exception
        import ernie_tiny_ds.runtime.engines     # the trainer's own import of it
        print("imported", deepspeed.__version__)
    """)
    env = {"PATH": "/usr/bin:/bin", "CUDA_HOME": "", "CUDA_PATH": "",
           "HOME": str(tmp_path), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "imported" in proc.stdout


@pytest.mark.slow
def test_commands_import_deepspeed_without_mlflow_and_get_it_back_after():
    """DeepSpeed's autotuner imports mlflow when installed (1 s of every rank's start-up): the CLI hides it
    while a command runs and gives it back after. The mlflow tracker takes it back itself: test_trackers'
    runs with train.report_to=[...,mlflow] fail without that."""
    pytest.importorskip("mlflow")
    script = textwrap.dedent("""
        import sys
        from ernie_tiny_ds import cli

        seen = {}
        def command(argv):  # a command that imports DeepSpeed
            import deepspeed.autotuning.autotuner as autotuner
            seen["deepspeed_saw_mlflow"] = autotuner.has_mlflow
            seen["mlflow_imported"] = "mlflow.tracking" in sys.modules
            return 0
        cli._run_command = command
        assert cli.main([]) == 0
        from mlflow.tracking import MlflowClient  # after the command: the real package
        print(seen, MlflowClient.__module__)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "{'deepspeed_saw_mlflow': False, 'mlflow_imported': False} mlflow.tracking.client" in proc.stdout, (
        proc.stdout[-2000:] + proc.stderr[-2000:])

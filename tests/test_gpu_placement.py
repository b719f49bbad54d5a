"""GPU placement under the environment a scheduler sets (CUDA faked where the rule is arithmetic), the master
address of a multi-node ssh launch, and the rendezvous port of a second job on one machine."""
import base64
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys

import pytest
import torch
from distributed import REPO, env, free_port, tiny_recipe
from test_launch import executable, in_process, render_dry_run, section, user_error


def _fake_cuda(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)


def _node(monkeypatch, local_rank: int, local_size: int, visible: str | None) -> None:
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setenv("LOCAL_SIZE", str(local_size))
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)


# --------------------------------------------------------------------------- ranks and GPUs
@pytest.mark.parametrize("local_rank, visible", [(5, "5"), (0, "0"), (7, "3")])
def test_a_rank_bound_to_its_own_gpu_takes_nccl_on_index_0(monkeypatch, local_rank, visible):
    """Slurm's --gpus-per-task=1 / --gpu-bind: 8 ranks on the node, each shown only its own GPU."""
    from ernie_tiny_ds.runtime import engines, process_group

    _fake_cuda(monkeypatch, 1)
    _node(monkeypatch, local_rank, 8, visible)
    assert process_group.process_group_backend("nccl") == "nccl"
    assert process_group.device_index() == 0 and engines.engine_args().device_rank == 0


@pytest.mark.parametrize("visible", [None, "0,1"])  # all GPUs of the node; the deepspeed launcher's shared list
def test_ranks_that_surely_share_a_gpu_are_still_refused_nccl(monkeypatch, visible):
    from ernie_tiny_ds.errors import ConfigError
    from ernie_tiny_ds.runtime import process_group

    _fake_cuda(monkeypatch, 1)
    _node(monkeypatch, 1, 2, visible)
    with pytest.raises(ConfigError, match="NCCL refuses two ranks on one GPU .*train.dist_backend=gloo"):
        process_group.process_group_backend("nccl")
    assert process_group.process_group_backend("gloo") == "gloo"
    assert process_group.device_index() == 0  # sharing: wrapped


@pytest.mark.parametrize("local_rank, local_size, visible", [(5, 8, "5"), (1, 2, None)])
def test_the_process_group_is_bound_to_this_rank_s_own_device(monkeypatch, local_rank, local_size, visible):
    """DeepSpeed would bind the group to cuda:LOCAL_RANK (cuda:5 for a rank shown only GPU 5, cuda:1 for
    the second of two ranks sharing one GPU): devices these ranks do not have. The trainer makes the
    group first, on device_index(), and binds NCCL only (gloo's group carries no device)."""
    from datetime import timedelta

    from ernie_tiny_ds.runtime import process_group

    _fake_cuda(monkeypatch, 1)
    _node(monkeypatch, local_rank, local_size, visible)
    args = process_group.cuda_group_args("nccl", timedelta(seconds=7))
    if "device_id" in args:  # torch versions where DeepSpeed binds it too
        assert args["device_id"] == torch.device("cuda", 0)
    assert args["backend"] == "nccl" and args["timeout"] == timedelta(seconds=7)
    assert process_group.cuda_group_args(None, timedelta(seconds=7))["backend"] == "nccl"  # auto: the accelerator's own
    assert "device_id" not in process_group.cuda_group_args("gloo", timedelta(seconds=7))


class _NcclRefused(Exception):
    pass


def test_nccl_s_own_duplicate_gpu_refusal_is_one_line(monkeypatch):
    """Where the local view cannot tell (a list shorter than the node's ranks), NCCL checks the physical GPUs
    at its first communicator; its refusal becomes the same one-line ConfigError, with NCCL's words."""
    import deepspeed
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    from ernie_tiny_ds.errors import ConfigError
    from ernie_tiny_ds.runtime import process_group

    _fake_cuda(monkeypatch, 1)
    _node(monkeypatch, 1, 2, "0")  # torchrun with CUDA_VISIBLE_DEVICES=0 exported for both ranks
    for key, value in {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(key, value)
    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):  # torch's defaults, restored after the test
        monkeypatch.setattr(c10d, name, getattr(c10d, name))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)

    def refuse(**kwargs):
        raise dist.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp:1970, invalid usage, NCCL version 2.21.5\n"
                                    "ncclInvalidUsage: Duplicate GPU detected : rank 1 and rank 0 both on CUDA "
                                    "device 1a000")

    # on CUDA the trainer makes the group itself (cuda_group_args), where NCCL binds the device and refuses
    monkeypatch.setattr(dist, "init_process_group", refuse)
    with pytest.raises(ConfigError) as caught:
        process_group.init_distributed(60, "nccl")
    message = str(caught.value)
    assert message.startswith("train.dist_backend: NCCL refuses two ranks on one GPU (ncclInvalidUsage: Duplicate "
                              "GPU detected : rank 1 and rank 0 both on CUDA device 1a000)")
    assert "\n" not in message and message.endswith("use train.dist_backend=gloo to share a GPU, or fewer ranks")
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: None)
    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kwargs: (_ for _ in ()).throw(_NcclRefused()))
    with pytest.raises(_NcclRefused):  # any other failure passes through unchanged
        process_group.init_distributed(60, "nccl")


# --------------------------------------------------------------------------- launch under Slurm's GPU binding
PROBE = """
import json, os, sys
keys = ("CUDA_VISIBLE_DEVICES", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE")
with open(os.path.join(sys.argv[-1], "rank" + os.environ["RANK"] + ".json"), "w") as f:
    json.dump({k: os.environ.get(k) for k in keys}, f)
"""


def _world(command: list[str]) -> dict:
    encoded = next(a for a in command if a.startswith("--world_info=")).split("=", 1)[1]
    return json.loads(base64.urlsafe_b64decode(encoded))


@pytest.mark.slow
def test_slurm_gpu_binding_reaches_the_ranks(tmp_path, monkeypatch, capsys, tokenizer_dir, vocab_size):
    """Node 1 of 2, where Slurm bound GPUs 4 and 5: the job script's launch gives its ranks exactly those
    (deepspeed's runner would give them 0 and 1), and deepspeed's per-node launcher, run for real with a
    probe in place of the trainer, numbers them 2 and 3 of 4."""
    recipe = tiny_recipe(tmp_path, tokenizer_dir, vocab_size)
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node-a slots=2\nnode-b slots=2\n")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5")
    sub = ["distill", "--config", str(recipe), "--stage", "general"]
    printed = in_process(["launch", "--no-ssh", "--node_rank", "1", "--hostfile", str(hostfile), "--num_nodes", "2",
                          "--num_gpus", "2", "--master_addr", "node-a", "--master_port", "29123", "--dry-run", "--",
                          *sub], capsys)
    command = shlex.split(section(printed, "command"))
    assert _world(command) == {"node-a": [0, 1], "node-b": [4, 5]}
    assert command[command.index("--module"):] == ["--module", "ernie_tiny_ds.cli", *sub]
    assert "--node_rank=1" in command and "--master_addr=node-a" in command

    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    real = command[:command.index("--module")] + [str(probe), str(tmp_path)]
    proc = subprocess.run(real, env={**env(), "CUDA_VISIBLE_DEVICES": "4,5"}, cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (2, 3)]
    assert [r["CUDA_VISIBLE_DEVICES"] for r in ranks] == ["4,5", "4,5"]
    assert [(r["LOCAL_RANK"], r["WORLD_SIZE"], r["LOCAL_SIZE"]) for r in ranks] == [("0", "4", "2"), ("1", "4", "2")]


@pytest.mark.slow
def test_the_slurm_job_script_launches_with_the_step_s_gpus(tmp_path, capsys, monkeypatch, tokenizer_dir, vocab_size):
    """The rendered job script under stand-in srun/scontrol, with the CUDA_VISIBLE_DEVICES Slurm gives the
    step on node 0: the real `launch` (made a dry run) plans ranks on GPUs 2 and 3."""
    monkeypatch.chdir(REPO)
    recipe = tiny_recipe(tmp_path, tokenizer_dir, vocab_size)
    script, _ = render_dry_run(["--nodes", "2", "--gpus-per-node", "2", "--gpu-request", "gpus", "--", "distill",
                                "--config", str(recipe)], capsys)
    bin_dir = tmp_path / "bin"
    executable(bin_dir / "scontrol", "#!/bin/bash\n[ \"$1 $2\" = 'show hostnames' ] && printf 'node-a\\nnode-b\\n'\n")
    executable(bin_dir / "srun", "#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\n"
                                 "SLURM_NODEID=0 CUDA_VISIBLE_DEVICES=2,3 exec \"$@\"\n")
    # the interpreter, with --dry-run added to the launch so that nothing starts
    dry = executable(bin_dir / "python", f"#!/bin/bash\nargs=(\"$@\"); exec {shlex.quote(sys.executable)} "
                                         "\"${args[@]:0:3}\" --dry-run \"${args[@]:3}\"\n")
    script = script.replace(f"PYTHON={shlex.quote(sys.executable)}", f"PYTHON={shlex.quote(str(dry))}")
    (tmp_path / "out" / "slurm").mkdir(parents=True)
    job_env = {**env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
               "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_JOB_NUM_NODES": "2"}
    proc = subprocess.run(["bash", "-c", script], env=job_env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    command = shlex.split(section(proc.stdout, "command"))
    assert _world(command) == {"node-a": [2, 3], "node-b": [0, 1]}
    assert "--node_rank=0" in command and "--master_addr=node-a" in command


@pytest.mark.parametrize("visible, gpus, message", [
    ("GPU-8932f937-d72c-4106-c12f-20bd9faed9f6", "1", "places ranks by GPU index, not by UUID"),
    ("0,1", "4", "4 ranks on localhost but CUDA_VISIBLE_DEVICES=0,1 shows 2 GPU"),
])
def test_scheduler_gpus_the_launcher_cannot_honour_are_one_line(monkeypatch, tokenizer_dir, vocab_size, tmp_path,
                                                               visible, gpus, message):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    recipe = tiny_recipe(tmp_path, tokenizer_dir, vocab_size)
    assert message in user_error(["launch", "--num_gpus", gpus, "--dry-run", "--", "distill", "--config", str(recipe)])


# --------------------------------------------------------------------------- master address over ssh
def _ssh_plan(tmp_path, hosts: str, tokenizer_dir, vocab_size, capsys=None):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(hosts)
    recipe = tiny_recipe(tmp_path, tokenizer_dir, vocab_size)
    args = ["launch", "--hostfile", str(hostfile), "--master_port", "29123", "--dry-run", "--", "distill", "--config",
            str(recipe)]
    return shlex.split(section(in_process(args, capsys), "command")) if capsys else user_error(args)


def test_multi_node_ssh_launch_takes_the_first_host_as_master(tmp_path, capsys, tokenizer_dir, vocab_size):
    command = _ssh_plan(tmp_path, "10.1.2.3 slots=2\n10.1.2.4 slots=2\n", tokenizer_dir, vocab_size, capsys)
    assert command[command.index("--master_addr") + 1] == "10.1.2.3"  # not deepspeed's `hostname -I` over ssh


@pytest.mark.parametrize("first, message", [
    ("localhost", r"first host 'localhost' resolves to (127\.0\.0\.1|::1), a loopback address"),
    ("no-such-node.invalid", r"first host 'no-such-node.invalid' does not resolve here"),
])
def test_multi_node_ssh_launch_refuses_a_master_others_cannot_reach(tmp_path, tokenizer_dir, vocab_size, first,
                                                                     message):
    error = _ssh_plan(tmp_path, f"{first} slots=2\n10.1.2.4 slots=2\n", tokenizer_dir, vocab_size)
    assert re.search(message, error) and "give --master_addr" in error


# --------------------------------------------------------------------------- rendezvous port
def _listening(port: int = 0) -> socket.socket:
    """Another job's rendezvous: a socket listening on every address."""
    held = socket.socket()
    held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    held.bind(("", port))
    held.listen()
    return held


def test_one_node_launch_without_a_port_picks_a_free_one(tmp_path, capsys, tokenizer_dir, vocab_size):
    recipe = tiny_recipe(tmp_path, tokenizer_dir, vocab_size)
    try:
        held = _listening(29500)  # the port every launch used to take
    except OSError:
        held = None  # something else holds it already: the same situation
    try:
        command = shlex.split(section(in_process(["launch", "--num_gpus", "2", "--dry-run", "--", "distill",
                                                  "--config", str(recipe)], capsys), "command"))
    finally:
        if held is not None:
            held.close()
    port = int(command[command.index("--master_port") + 1])
    assert port != 29500
    _listening(port).close()  # it was free


@pytest.mark.slow
def test_a_port_in_use_is_one_line_and_exit_code_2(tmp_path, tokenizer_dir, vocab_size):
    recipe = tiny_recipe(tmp_path, tokenizer_dir, vocab_size)
    port = free_port()
    with _listening(port):
        # its own session: were the ranks started after all, they go with it
        proc = subprocess.Popen([sys.executable, "-m", "ernie_tiny_ds.cli", "launch", "--num_gpus", "2",
                                 "--master_port", str(port), "--", "distill", "--config", str(recipe)], env=env(),
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
    assert proc.returncode == 2, out[-3000:] + err[-3000:]
    assert err.strip() == (f"error: --master_port {port} is already in use on this machine (another job?); "
                           "leave --master_port out to get a free one")
    assert out == ""

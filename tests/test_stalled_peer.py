"""A stalled (alive, silent) rank ends the job after train.dist_timeout_s with one line naming it; the gloo
interface follows NCCL's when only NCCL's is set."""
import json
import os
import re
import signal
import subprocess
import time

import pytest
from distributed import REPO, deepspeed_cmd, env, tiny_recipe

TIMEOUT_S = 10
# after the survivor gives up, the deepspeed launcher waits up to 30 s for the stopped rank to take its
# SIGTERM (a stopped process cannot) before it SIGKILLs it: the test sends that SIGKILL itself once the
# survivor has ended, which is all the launcher's wait would lead to (the job's end is still the launcher's)
LAUNCHER_GRACE_S = 30


def _ended(pid: int) -> bool:
    """Gone, or a zombie that the launcher has not reaped yet."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _kill_the_stopped_rank_once_the_survivor_has_ended(log_path, survivor_pid: int, stopped_pid: int,
                                                       proc, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if "error:" in log_path.read_text() and _ended(survivor_pid):
            os.kill(stopped_pid, signal.SIGKILL)
            return
        time.sleep(0.2)


@pytest.mark.slow
def test_a_stopped_rank_ends_the_job_after_the_timeout_and_is_named(tmp_path, tokenizer_dir, vocab_size):
    recipe = tiny_recipe(tmp_path, tokenizer_dir, vocab_size,
                         train={"max_steps": 100000, "save_every": 100000, "dist_timeout_s": TIMEOUT_S})
    log = open(tmp_path / "log.txt", "w+")
    # NCCL's interface variable alone: the ranks derive gloo's from it ("lo" exists everywhere)
    proc = subprocess.Popen(deepspeed_cmd(["distill", "--config", str(recipe), "--stage", "general"]),
                            env={**env(), "NCCL_SOCKET_IFNAME": "lo"}, cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    stopped_pid = None
    try:
        metrics = tmp_path / "out/general/metrics.jsonl"
        deadline = time.time() + 180
        while time.time() < deadline and not metrics.is_file():
            assert proc.poll() is None, (tmp_path / "log.txt").read_text()[-4000:]
            time.sleep(0.5)
        time.sleep(1)  # a step or two further, inside the loop's collectives
        ranks = tmp_path / "out/general/.ranks"
        survivor_pid = json.loads((ranks / "rank0.json").read_text())["pid"]
        stopped_pid = json.loads((ranks / "rank1.json").read_text())["pid"]
        os.kill(stopped_pid, signal.SIGSTOP)
        stopped_at = time.time()
        _kill_the_stopped_rank_once_the_survivor_has_ended(tmp_path / "log.txt", survivor_pid, stopped_pid, proc,
                                                           timeout=TIMEOUT_S + 90)
        # torch's own default would hold rank 0 for 30 minutes: bound the wait so that fails, not hangs
        code = proc.wait(timeout=TIMEOUT_S + LAUNCHER_GRACE_S + 90)
        took = time.time() - stopped_at
        out = (tmp_path / "log.txt").read_text()
        assert code != 0
        assert took < TIMEOUT_S + LAUNCHER_GRACE_S + 30, (took, out[-3000:])
        lines = [line for line in out.splitlines() if "error:" in line]
        assert len(lines) == 1, out[-3000:]
        assert re.search(rf"\[rank 0\] error: rank 1 \(pid {stopped_pid}\) stopped responding: its process is "
                         rf"stopped .* after train.dist_timeout_s \(.*Timed out waiting {TIMEOUT_S * 1000}ms",
                         lines[0]), out[-3000:]
        assert "Traceback" not in out
    finally:
        if stopped_pid is not None:
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(stopped_pid, sig)
                except ProcessLookupError:
                    pass
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.mark.parametrize("nccl, interfaces, gloo", [
    ("eth", ["lo", "docker0", "eth1", "eth0"], "eth1"),      # NCCL's prefix: the first interface it matches
    ("=eth0", ["lo", "eth01", "eth0"], "eth0"),              # "=": exact names only
    ("ib,eth", ["lo", "eth0"], "eth0"),                      # a list: the first pattern that matches here
    ("^docker,lo", ["lo", "eth0"], None),                    # an exclusion list has no gloo form
    ("ib", ["lo", "eth0"], None),                            # nothing matches: gloo keeps its own choice
])
def test_gloo_interface_follows_ncclS_when_only_nccl_is_set(nccl, interfaces, gloo):
    from ernie_tiny_ds.runtime.collectives import gloo_interface_from_nccl

    environment = {"NCCL_SOCKET_IFNAME": nccl}
    assert gloo_interface_from_nccl(environment, interfaces) == gloo
    assert environment.get("GLOO_SOCKET_IFNAME") == gloo
    own = {"NCCL_SOCKET_IFNAME": "eth", "GLOO_SOCKET_IFNAME": "bond0"}  # the user's own choice stays
    assert gloo_interface_from_nccl(own, interfaces) is None and own["GLOO_SOCKET_IFNAME"] == "bond0"


class _Reached(Exception):
    pass


def test_init_distributed_sets_gloo_interface_and_timeouts_before_any_group(monkeypatch):
    """What the process group is built with: the interface and torch's default timeout for later groups
    (DeepSpeed's own) are in place when deepspeed.init_distributed runs."""
    import deepspeed
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    from ernie_tiny_ds.runtime import process_group

    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1", "NCCL_SOCKET_IFNAME": "lo"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):  # torch's defaults, restored after the test
        monkeypatch.setattr(c10d, name, getattr(c10d, name))
    seen = {}

    def fake_init(dist_backend, timeout, verbose):
        seen.update(gloo=os.environ.get("GLOO_SOCKET_IFNAME"), timeout=timeout, later=c10d._get_default_timeout("gloo"))
        raise _Reached

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(deepspeed, "init_distributed", fake_init)
    with pytest.raises(_Reached):
        process_group.init_distributed(37)
    assert seen["gloo"] == "lo"
    assert seen["timeout"].total_seconds() == 37 and seen["later"].total_seconds() == 37

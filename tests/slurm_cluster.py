"""A real one-node Slurm for tests (launcher/slurm/local_cluster.sh), and polling helpers with deadlines."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from distributed import REPO, env, free_port

CLUSTER_SCRIPT = REPO / "launcher" / "slurm" / "local_cluster.sh"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}
# pending for a reason that time will not fix
HOPELESS = {"PartitionConfig", "BadConstraints", "PartitionNodeLimit", "PartitionTimeLimit", "InvalidAccount",
            "InvalidQOS", "ReqNodeNotAvail", "JobHeldAdmin", "JobHeldUser"}


class SlurmUnavailable(Exception):
    """Slurm is neither installed nor installable here (not root, no apt-get)."""


@dataclass
class LocalSlurm:
    state_dir: Path
    conf: Path

    def env(self) -> dict:
        return {**env(), "SLURM_CONF": str(self.conf)}

    def run(self, args: list[str], timeout: int = 60) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=self.env(), capture_output=True, text=True, timeout=timeout)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (finished jobs stay listed for MinJobAge = 10 minutes)."""
        out = self.run(["scontrol", "show", "job", "--oneliner", job_id])
        if out.returncode != 0:
            raise AssertionError(f"scontrol show job {job_id}: {out.stderr.strip()}")
        return dict(re.findall(r"(\w+)=(\S*)", out.stdout))

    def wait_for(self, job_id: str, condition, what: str, timeout: float, log: Path | None = None,
                 poll_s: float = 1.0) -> dict:
        """Poll the job until condition(job) holds; fail with the log's tail at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if condition(job):
                return job
            hopeless = job.get("JobState") == "PENDING" and job.get("Reason") in HOPELESS
            if hopeless or time.monotonic() > deadline:
                tail = log.read_text()[-6000:] if log is not None and log.is_file() else "(no log)"
                when = "(it cannot run)" if hopeless else f"within {timeout:.0f} s"
                raise AssertionError(f"job {job_id}: {what} not seen {when}; now {job.get('JobState')} "
                                     f"({job.get('Reason')})\n--- log\n{tail}")
            time.sleep(poll_s)

    def wait_finished(self, job_id: str, timeout: float, log: Path | None = None) -> dict:
        return self.wait_for(job_id, lambda j: j.get("JobState") in FINAL_STATES, "the end", timeout, log)


def start_cluster() -> LocalSlurm:
    """Install if needed and start munged, slurmctld and slurmd with their state in a fresh temp folder."""
    if shutil.which("sbatch") is None and (os.geteuid() != 0 or shutil.which("apt-get") is None):
        raise SlurmUnavailable("sbatch is not installed and cannot be (needs root and apt-get)")
    if os.geteuid() != 0:
        raise SlurmUnavailable("starting slurmd and munged for a local cluster needs root")
    # short path: the munge socket lives here and unix socket paths are limited to 108 bytes
    state = Path(tempfile.mkdtemp(prefix="ets-slurm-"))
    ports = {"SLURMCTLD_PORT": str(free_port()), "SLURMD_PORT": str(free_port())}
    proc = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start", str(state)], env={**env(), **ports},
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        logs = "".join(f"\n--- {p}\n{p.read_text()[-3000:]}" for p in sorted(state.glob("*.log")))
        raise AssertionError(f"local Slurm did not start (exit {proc.returncode}):\n{proc.stderr}{logs}")
    return LocalSlurm(state, state / "slurm.conf")


def stop_cluster(cluster: LocalSlurm) -> None:
    subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop", str(cluster.state_dir)], env=env(), capture_output=True,
                   timeout=120)
    shutil.rmtree(cluster.state_dir, ignore_errors=True)

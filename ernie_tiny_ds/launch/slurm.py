"""Render a Slurm batch script for one ernie-tiny-ds sub-command, and the sbatch command that submits it.

Values that Slurm parses itself (#SBATCH lines) are checked against strict patterns; everything the shell
sees is quoted once with shlex.quote; paths go to sbatch as list arguments.
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..assets.shipped import shipped
from ..errors import UserError
from ..outputs import OUTPUT_DIR, holds_nothing, write_marker

DEFAULT_TEMPLATE = shipped("launcher/slurm/job.sbatch")
LOG_NAME = "slurm-%j.out"
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
_NAME = re.compile(r"[\w.-]+")
_PARTITIONS = re.compile(r"[\w.-]+(,[\w.-]+)*")
# minutes | M:S | H:M:S | D-H | D-H:M | D-H:M:S  (sbatch --time)
_TIME = re.compile(r"(?:(?P<days>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"
                   r"|(?P<h>\d+):(?P<m>\d+):(?P<s>\d+)|(?P<mm>\d+):(?P<ss>\d+)|(?P<minutes>\d+))")


@dataclass
class SlurmJob:
    command: list[str]            # the ernie-tiny-ds sub-command and its arguments
    nodes: int
    ranks_per_node: int           # GPUs per node, or CPU ranks on nodes without GPUs
    request_gpus: bool            # ask for --gpus-per-node (else one CPU per rank)
    python: str                   # the interpreter that has ernie_tiny_ds installed (same path on every node)
    log_dir: Path
    output_dir: Path | None       # the recipe's output_dir: where STOP asks the training to checkpoint
    job_name: str = "ernie-tiny-ds"
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    signal_seconds: int = 300     # USR1 this long before the time limit


def time_limit_seconds(text: str) -> int | None:
    """Seconds of an sbatch --time value; None for no limit. Raises UserError for anything sbatch would refuse."""
    if text.lower() in ("infinite", "unlimited"):
        return None
    m = _TIME.fullmatch(text)
    if m is None:
        raise UserError(f"--time {text!r}: expected minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS")
    g = {k: int(v) for k, v in m.groupdict().items() if v is not None}
    if "minutes" in g:
        return g["minutes"] * 60
    if "mm" in g:
        return g["mm"] * 60 + g["ss"]
    if "h" in g:
        return g["h"] * 3600 + g["m"] * 60 + g["s"]
    return g["days"] * 86400 + g["dh"] * 3600 + g.get("dm", 0) * 60 + g.get("ds", 0)


def validate(job: SlurmJob) -> None:
    if job.nodes < 1:
        raise UserError(f"--nodes must be >= 1, got {job.nodes}")
    if job.ranks_per_node < 1:
        raise UserError(f"--gpus-per-node must be >= 1, got {job.ranks_per_node}")
    if not _NAME.fullmatch(job.job_name):
        raise UserError(f"--job-name {job.job_name!r}: use letters, digits, '_', '.' and '-'")
    if job.partition is not None and not _PARTITIONS.fullmatch(job.partition):
        raise UserError(f"--partition {job.partition!r}: expected a partition name (or a comma-separated list)")
    if job.account is not None and not _NAME.fullmatch(job.account):
        raise UserError(f"--account {job.account!r}: expected an account name")
    if not 1 <= job.signal_seconds <= 65535:
        raise UserError(f"--signal-seconds must be in 1..65535 (a Slurm limit), got {job.signal_seconds}")
    if job.time is not None:
        limit = time_limit_seconds(job.time)
        if limit is not None and limit <= job.signal_seconds:
            raise UserError(f"--time {job.time} is not longer than --signal-seconds {job.signal_seconds}: the "
                            "checkpoint request would come before the job had started; lower --signal-seconds")
    for what, path in (("log folder", job.log_dir), ("output_dir", job.output_dir)):
        if path is not None and ("\n" in str(path) or "\\" in str(path)):
            raise UserError(f"{what} {str(path)!r}: Slurm cannot take a path with a newline or backslash")


def log_pattern(log_dir: Path) -> str:
    """sbatch --output value: '%' in the folder is literal ('%%'), only the file name's %j expands."""
    return str(log_dir).replace("%", "%%") + "/" + LOG_NAME


def _directives(job: SlurmJob) -> tuple[str, str]:
    if job.request_gpus:
        resources = f"#SBATCH --gpus-per-node={job.ranks_per_node}"
    else:
        resources = f"#SBATCH --cpus-per-task={job.ranks_per_node}  # no GPUs on these nodes: one CPU per rank"
    optional = [f"#SBATCH --{name}={value}" for name, value in
                (("partition", job.partition), ("time", job.time), ("account", job.account)) if value is not None]
    return resources, "\n".join(optional)


def render(job: SlurmJob, template: Path = DEFAULT_TEMPLATE) -> str:
    validate(job)
    if not template.is_file():
        raise UserError(f"Slurm template not found: {template} (pass --template)")
    resources, optional = _directives(job)
    values = {
        "job_name": job.job_name, "nodes": str(job.nodes), "resource_directives": resources,
        "signal_seconds": str(job.signal_seconds), "optional_directives": optional,
        "python": shlex.quote(job.python), "output_dir": shlex.quote(str(job.output_dir or "")),
        "log_dir": shlex.quote(str(job.log_dir)), "ranks_per_node": str(job.ranks_per_node),
        "command": shlex.join(job.command),
    }

    def fill(match: re.Match) -> str:
        if match[1] not in values:
            raise UserError(f"{template}: unknown placeholder {{{{{match[1]}}}}}")
        return values[match[1]]

    return _PLACEHOLDER.sub(fill, template.read_text())


def sbatch_command(job: SlurmJob, script: Path, workdir: Path) -> list[str]:
    return ["sbatch", "--parsable", f"--chdir={workdir}", f"--output={log_pattern(job.log_dir)}", str(script)]


def partition_has_gpus(partition: str | None) -> bool | None:
    """Whether the partition's nodes offer gpu GRES; None when sinfo cannot tell (no Slurm here)."""
    if shutil.which("sinfo") is None:
        return None
    cmd = ["sinfo", "--noheader", "--format=%G"] + (["--partition", partition] if partition else [])
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return "gpu" in out.stdout


def submit(job: SlurmJob, script_text: str, script: Path, workdir: Path) -> str:
    """Write the script, run sbatch, return the job id."""
    if shutil.which("sbatch") is None:
        raise UserError("sbatch not found: run this on a Slurm login node (or use --dry-run to see the script)")
    # the default log folder is OUTPUT_DIR/slurm: made here, it must not make the job's output_dir look
    # like a user's folder that the job may not write into (outputs.claim_output_dir)
    adopt = job.output_dir is not None and job.output_dir in job.log_dir.parents and holds_nothing(job.output_dir)
    job.log_dir.mkdir(parents=True, exist_ok=True)
    if adopt:
        write_marker(job.output_dir, OUTPUT_DIR)
    script.write_text(script_text)
    script.chmod(0o755)
    out = subprocess.run(sbatch_command(job, script, workdir), capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise UserError(f"sbatch refused the job: {out.stderr.strip() or out.stdout.strip()}")
    job_id = out.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise UserError(f"sbatch answered {out.stdout.strip()!r}, not a job id")
    return job_id

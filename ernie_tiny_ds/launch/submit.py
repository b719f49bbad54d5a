"""`ernie-tiny-ds submit slurm`: run a sub-command as a Slurm batch job on N nodes with G ranks each.

    ernie-tiny-ds submit slurm --nodes 2 --gpus-per-node 8 --time 24:00:00 -- distill --config R --stage general

The job checkpoints and requeues itself before its time limit; the requeued job resumes.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import time
from pathlib import Path

from ..config import load_recipe
from ..errors import UserError
from .runner import parse_subcommand, strip_separator
from .slurm import DEFAULT_TEMPLATE, LOG_NAME, SlurmJob, partition_has_gpus, render, sbatch_command, submit, validate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    schedulers = parser.add_subparsers(dest="scheduler", required=True, metavar="SCHEDULER")
    p = schedulers.add_parser("slurm", help="submit with sbatch", description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", "--gpus_per_node", dest="gpus_per_node", type=int, required=True,
                   help="ranks per node: GPUs, or CPU ranks when the nodes have none")
    p.add_argument("--partition")
    p.add_argument("--time", help="time limit (sbatch --time), e.g. 24:00:00")
    p.add_argument("--account")
    p.add_argument("--job-name", dest="job_name", default=None, help="default: ernie-tiny-ds-SUBCOMMAND")
    p.add_argument("--log-dir", dest="log_dir", help="job logs and script (default: OUTPUT_DIR/slurm of the recipe)")
    p.add_argument("--signal-seconds", dest="signal_seconds", type=int, default=300,
                   help="ask the training to checkpoint this long before the time limit (default 300)")
    p.add_argument("--gpu-request", dest="gpu_request", choices=("auto", "gpus", "cpus"), default="auto",
                   help="request GPUs or one CPU per rank; auto asks sinfo whether the partition has GPUs")
    p.add_argument("--template", type=Path, default=DEFAULT_TEMPLATE, help="batch-script template")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                   help="print the batch script and the sbatch command; submit nothing")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- SUBCOMMAND ARGS",
                   help="what you would give ernie-tiny-ds itself, e.g. distill --config R")


def recipe_output_dir(sub: argparse.Namespace) -> Path | None:
    if getattr(sub, "config", None) is None:
        return None
    return Path(load_recipe(sub.config, getattr(sub, "overrides", None)).output_dir).absolute()


def wants_gpus(choice: str, partition: str | None) -> bool:
    if choice != "auto":
        return choice == "gpus"
    found = partition_has_gpus(partition)
    return True if found is None else found  # without sinfo (dry run elsewhere) assume a GPU cluster


def build_job(args: argparse.Namespace) -> SlurmJob:
    command = strip_separator(list(args.command))
    sub = parse_subcommand(command, args.parse_args)
    output_dir = recipe_output_dir(sub)
    if args.log_dir is None and output_dir is None:
        raise UserError(f"'{command[0]}' has no recipe output_dir to keep the job logs in: give --log-dir")
    log_dir = Path(args.log_dir).absolute() if args.log_dir else output_dir / "slurm"
    job = SlurmJob(command=command, nodes=args.nodes, ranks_per_node=args.gpus_per_node, request_gpus=True,
                   python=sys.executable, log_dir=log_dir, output_dir=output_dir,
                   job_name=args.job_name or f"ernie-tiny-ds-{command[0]}", partition=args.partition,
                   time=args.time, account=args.account, signal_seconds=args.signal_seconds)
    validate(job)  # before sinfo is asked about a partition name that may be malformed
    return dataclasses.replace(job, request_gpus=wants_gpus(args.gpu_request, args.partition))


def run(args: argparse.Namespace) -> int:
    job = build_job(args)
    text = render(job, args.template)
    script = job.log_dir / f"{job.job_name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    workdir = Path(os.getcwd())
    if args.dry_run:
        print(f"# ---- batch script ({script}) ----\n{text}"
              f"# ---- sbatch command ----\n{shlex.join(sbatch_command(job, script, workdir))}")
        return 0
    job_id = submit(job, text, script, workdir)
    print(f"submitted batch job {job_id}\nlog: {job.log_dir / LOG_NAME.replace('%j', job_id)}\nscript: {script}",
          flush=True)
    return 0

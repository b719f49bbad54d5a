"""`ernie-tiny-ds launch`: run one sub-command on every rank of one or more nodes through the deepspeed runner.

    ernie-tiny-ds launch --hostfile H --num_gpus 8 -- distill --config R --stage general
    ernie-tiny-ds launch --no-ssh --node_rank 1 --hostfile H --master_addr node0 -- distill ...

With a hostfile of several hosts the runner starts the other nodes over ssh (pdsh) and exports the
environment of `.deepspeed_env` there; with --no-ssh every node runs its own launcher (a Slurm job step).
The exit code is the job's.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

# What every rank needs to behave like the launching shell; PYTHON* is exported by deepspeed itself.
FORWARDED_ENV = ("OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR", "HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                 "TRANSFORMERS_NO_ADVISORY_WARNINGS", "TOKENIZERS_PARALLELISM", "PYTHONPATH", "PYTHONUNBUFFERED")
FORWARDED_PREFIXES = ("NCCL_", "GLOO_SOCKET_", "TRITON_")

# deepspeed's pdsh runner pastes arguments, exports and the working directory into a remote shell line
# (a word with a space is wrapped in double quotes, nothing else is escaped): only these survive intact.
_SSH_SAFE_WORD = re.compile(r"[\w@+=:,./-]*")
_SSH_SAFE_SPACED = re.compile(r"[\w@+=:,./ -]*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# an export value the runner wraps in double quotes (it escapes nothing): $ ` \ " still act there,
# and pdsh itself rewrites %h, %n, %u anywhere in the line
_SSH_UNSAFE_QUOTED = re.compile(r'[$`\\"!%\n\r]')
# node 0's address goes unquoted into the remote line (--master_addr=ADDR): a host name or an IP
_HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
# what deepspeed's runner exports to the remote nodes from the launching environment on its own:
# runner.EXPORT_ENVS and every accelerator's export_envs() (variables whose names start so)
RUNNER_EXPORTED_PREFIXES = ("MLFLOW", "PYTHON", "MV2", "UCX", "NCCL", "BKCL", "XPU", "XMLIR", "LD_LIBRARY", "PATH",
                            "NEUWARE_HOME", "CNCL", "ASCEND", "HCCL")
NOT_LAUNCHABLE = ("launch", "submit")


@dataclass
class Host:
    name: str
    slots: int


@dataclass
class LaunchPlan:
    command: list[str]                      # the deepspeed runner command, one list element per argument
    environment: dict[str, str]             # what every rank gets (the .deepspeed_env content)
    uses_ssh: bool                          # the runner will start remote nodes through pdsh
    hosts: list[Host] = field(default_factory=list)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hostfile", help="MPI-style hostfile: one 'HOST slots=N' line per node")
    parser.add_argument("--num_nodes", "--num-nodes", type=int, default=None,
                        help="use the first N hosts of the hostfile (default: all)")
    parser.add_argument("--num_gpus", "--num-gpus", type=int, default=None,
                        help="ranks per node (GPUs; CPU ranks on a machine without GPUs; default: all slots)")
    parser.add_argument("--master_addr", "--master-addr",
                        help="address of node 0 (required with --no-ssh across nodes)")
    parser.add_argument("--master_port", "--master-port", type=int, default=29500)
    parser.add_argument("--no-ssh", "--no_ssh", dest="no_ssh", action="store_true",
                        help="start only this node's ranks (each node runs its own launch, e.g. one Slurm task)")
    parser.add_argument("--node_rank", "--node-rank", type=int, default=None, help="this node's index (--no-ssh)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="extra environment for every rank (repeatable)")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="print the command and the environment file; run nothing")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="-- SUBCOMMAND ARGS",
                        help="what you would give ernie-tiny-ds itself, e.g. distill --config R")


def strip_separator(command: list[str]) -> list[str]:
    return command[1:] if command[:1] == ["--"] else command


def parse_subcommand(command: list[str], build_parser) -> argparse.Namespace:
    """Check the sub-command here, before any node starts; its argparse message becomes our error.
    `build_parser` is the CLI's own (handed down by the CLI, which sits above this layer)."""
    if not command:
        raise UserError("no sub-command to run: add it after '--', e.g. -- distill --config recipe.yaml")
    if command[0] in NOT_LAUNCHABLE:
        raise UserError(f"'{command[0]}' cannot run on the ranks; give a training sub-command such as distill")
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return build_parser().parse_args(command)
    except SystemExit:
        lines = [line for line in captured.getvalue().splitlines() if line.strip()]
        detail = lines[-1].split("error: ", 1)[-1] if lines else "not a valid sub-command"
        raise UserError(f"the sub-command {shlex.join(command)!s} is not valid: {detail}") from None


def read_hostfile(path: str) -> list[Host]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"hostfile not found: {p}")
    hosts: list[Host] = []
    for number, line in enumerate(p.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
        if match is None:
            raise UserError(f"{p} line {number}: expected 'HOST slots=N', got {line!r}")
        if not _HOST.fullmatch(match[1]):  # '-oProxyCommand=…' would be an option to ssh
            raise UserError(f"{p} line {number}: {match[1]!r} is not a host name or address")
        if any(h.name == match[1] for h in hosts):
            raise UserError(f"{p} line {number}: host {match[1]!r} is listed twice")
        if int(match[2]) < 1:
            raise UserError(f"{p} line {number}: slots must be >= 1")
        hosts.append(Host(match[1], int(match[2])))
    if not hosts:
        raise UserError(f"{p}: no hosts (expected lines of 'HOST slots=N')")
    return hosts


def user_env_files() -> dict[str, str]:
    """The .deepspeed_env files the runner would read itself (home, then the cwd); ours replaces them, so it
    carries their content."""
    name = os.environ.get("DS_ENV_FILE", ".deepspeed_env")
    found: dict[str, str] = {}
    for folder in (os.path.expanduser("~"), "."):
        path = Path(folder, name)
        if path.is_file():
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                key, sep, value = line.partition("=")
                if line.strip() and not sep:
                    raise UserError(f"{path} line {number}: expected KEY=VALUE")
                if sep and not _ENV_NAME.fullmatch(key.strip()):
                    raise UserError(f"{path} line {number}: {key.strip()!r} is not a variable name")
                if sep:
                    found[key.strip()] = value.strip()
    return found


def rank_environment(extra: list[str], base: dict[str, str] | None = None,
                     files: dict[str, str] | None = None) -> dict[str, str]:
    base = os.environ if base is None else base
    env = {k: v for k, v in base.items() if k in FORWARDED_ENV or k.startswith(FORWARDED_PREFIXES)}
    env.setdefault("PYTHONUNBUFFERED", "1")  # rank output reaches the job log as it happens
    env.update(files or {})
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or not _ENV_NAME.fullmatch(key):
            raise UserError(f"--env {item!r}: expected KEY=VALUE with KEY a variable name")
        env[key] = value
    for key, value in env.items():
        # the runner reads the file line by line and strips each value
        if "\n" in value or "\r" in value or value != value.strip():
            raise UserError(f"environment value of {key} cannot go into .deepspeed_env "
                            "(newline or leading/trailing space)")
    return env


def env_file_text(env: dict[str, str]) -> str:
    return "".join(f"{k}={v}\n" for k, v in sorted(env.items()))


def deepspeed_runner() -> list[str]:
    script = Path(sys.executable).parent / "deepspeed"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "deepspeed.launcher.runner"]


def check_ssh_safe(command: list[str], env: dict[str, str], master_addr: str | None = None,
                   launch_env: dict[str, str] | None = None) -> None:
    """Refuse what deepspeed's pdsh runner would hand to a remote shell so that it runs or changes:
    the sub-command's words, `export KEY=VALUE; ` of every .deepspeed_env entry and of the variables
    the runner exports itself (RUNNER_EXPORTED_PREFIXES of the launching environment; a value with
    other characters than [\\w@%+=:,./-] is put in double quotes, unescaped), `cd CWD;` and
    `--master_addr=ADDR` (both unquoted)."""
    def bad(text: str, spaced_ok: bool) -> bool:
        return not (_SSH_SAFE_SPACED if spaced_ok else _SSH_SAFE_WORD).fullmatch(text)

    def bad_export(key: str, value: str) -> bool:
        return (not _ENV_NAME.fullmatch(key) or bool(_SSH_UNSAFE_QUOTED.search(value))
                or value != value.strip())

    launch_env = os.environ if launch_env is None else launch_env
    exported = {k: v for k, v in launch_env.items() if k.startswith(RUNNER_EXPORTED_PREFIXES)}
    offenders = [a for a in command if bad(a, spaced_ok=True)]
    offenders += [f"{k}={v}" for k, v in env.items() if bad_export(k, v)]
    offenders += [f"{k}={v} (exported by deepspeed from this shell)" for k, v in sorted(exported.items())
                  if k not in env and bad_export(k, v)]
    if master_addr is not None and not _HOST.fullmatch(master_addr):
        offenders.append(f"--master_addr {master_addr}")
    if bad(os.getcwd(), spaced_ok=False):
        offenders.append(f"working directory {os.getcwd()}")
    if offenders:
        raise UserError("deepspeed's ssh (pdsh) launch passes arguments through a remote shell without quoting; "
                        f"these would not arrive intact: {', '.join(repr(o) for o in offenders)}. Rename them, or "
                        "run one `launch --no-ssh --node_rank R` per node (as the Slurm job does)")


def plan_launch(args: argparse.Namespace, base_env: dict[str, str] | None = None) -> LaunchPlan:
    command = strip_separator(list(args.command))
    parse_subcommand(command, args.build_parser)
    hosts = read_hostfile(args.hostfile) if args.hostfile else []
    num_nodes = args.num_nodes if args.num_nodes is not None else (len(hosts) or 1)
    if num_nodes < 1:
        raise UserError(f"--num_nodes must be >= 1, got {num_nodes}")
    if num_nodes > max(len(hosts), 1):
        where = f"the hostfile {args.hostfile} lists {len(hosts)}" if hosts else "give --hostfile to name them"
        raise UserError(f"--num_nodes {num_nodes}: {where}")
    if args.num_gpus is not None and args.num_gpus < 1:
        raise UserError(f"--num_gpus must be >= 1, got {args.num_gpus}")
    if not 0 < args.master_port < 65536:
        raise UserError(f"--master_port must be in 1..65535, got {args.master_port}")
    if args.master_addr is not None and not _HOST.fullmatch(args.master_addr):
        raise UserError(f"--master_addr {args.master_addr!r} is not a host name or address")
    if args.node_rank is not None and not args.no_ssh:
        raise UserError("--node_rank needs --no-ssh (with ssh the runner numbers the nodes itself)")
    if args.no_ssh:
        if args.node_rank is None:
            raise UserError("--no-ssh needs --node_rank (this node's index, 0 for the node at --master_addr)")
        if not 0 <= args.node_rank < num_nodes:
            raise UserError(f"--node_rank {args.node_rank} is outside 0..{num_nodes - 1}")
        if num_nodes > 1 and not args.master_addr:
            raise UserError("--no-ssh across nodes needs --master_addr (the address of node 0)")
    uses_ssh = num_nodes > 1 and not args.no_ssh
    env = rank_environment(args.env, base_env, user_env_files() if uses_ssh else None)
    if uses_ssh:
        check_ssh_safe(command, env, args.master_addr, base_env)

    cmd = deepspeed_runner()
    if args.hostfile:
        cmd += ["--hostfile", str(Path(args.hostfile).resolve()), "--num_nodes", str(num_nodes)]
    if args.num_gpus is not None:
        cmd += ["--num_gpus", str(args.num_gpus)]
    # one node: its own address; else deepspeed asks a hostfile's first host over ssh (`hostname -I`)
    master_addr = args.master_addr or ("127.0.0.1" if num_nodes == 1 else None)
    if master_addr:
        cmd += ["--master_addr", master_addr]
    cmd += ["--master_port", str(args.master_port)]
    if args.no_ssh:
        cmd += ["--no_ssh", "--node_rank", str(args.node_rank)]
    cmd += ["--module", "ernie_tiny_ds.cli", *command]
    return LaunchPlan(cmd, env, uses_ssh, hosts[:num_nodes])


def describe(plan: LaunchPlan) -> str:
    how = ("written to a .deepspeed_env file that the runner exports to every node" if plan.uses_ssh
           else "set in the environment of this node's ranks")
    return (f"# environment of every rank ({how}):\n{env_file_text(plan.environment)}"
            f"# command:\n{shlex.join(plan.command)}\n")


def run_plan(plan: LaunchPlan) -> int:
    env = {**os.environ, **plan.environment}
    with tempfile.TemporaryDirectory(prefix="ernie-tiny-ds-launch-") as tmp:
        if plan.uses_ssh:
            env_file = Path(tmp) / ".deepspeed_env"
            env_file.write_text(env_file_text(plan.environment))
            # the runner looks for DS_ENV_FILE under ~ and the cwd; an absolute path points at ours
            env["DS_ENV_FILE"] = str(env_file)
        # SIGUSR1 means "checkpoint and stop" to the ranks, which install their own handler. This process
        # and the runner's would die of it (scancel --signal=USR1 reaches every process of a job step), so
        # they ignore it; an ignored signal stays ignored across fork and exec.
        previous = {signal.SIGUSR1: signal.signal(signal.SIGUSR1, signal.SIG_IGN)}
        try:
            child = subprocess.Popen(plan.command, env=env)
            forward = lambda signum, _frame: child.send_signal(signum)  # noqa: E731 (cancel reaches the runner)
            previous.update({s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)})
            code = child.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    return code if code >= 0 else 128 - code


def run(args: argparse.Namespace) -> int:
    plan = plan_launch(args)
    if args.dry_run:
        print(describe(plan), end="")
        return 0
    return run_plan(plan)

"""`ernie-tiny-ds launch`: run one sub-command on every rank of one or more nodes through the deepspeed runner.

    ernie-tiny-ds launch --hostfile H --num_gpus 8 -- distill --config R --stage general
    ernie-tiny-ds launch --no-ssh --node_rank 1 --hostfile H --master_addr node0 -- distill ...

With a hostfile of several hosts the runner starts the other nodes over ssh (pdsh) and exports the
environment of `.deepspeed_env` there; with --no-ssh every node runs its own launcher (a Slurm job step).
Where CUDA_VISIBLE_DEVICES names this node's GPUs, deepspeed's per-node launcher is started directly with
them (the runner would reset them). The exit code is the job's.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import errno
import io
import ipaddress
import json
import os
import re
import shlex
import signal
import socket
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
MULTI_NODE_PORT = 29500  # every node must name the same port, so several nodes cannot each pick a free one


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
    world: dict[str, list[int]] | None = None  # ranks' GPUs per node, when this node's come from a scheduler


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hostfile", help="MPI-style hostfile: one 'HOST slots=N' line per node")
    parser.add_argument("--num_nodes", "--num-nodes", type=int, default=None,
                        help="use the first N hosts of the hostfile (default: all)")
    parser.add_argument("--num_gpus", "--num-gpus", type=int, default=None,
                        help="ranks per node (GPUs; CPU ranks on a machine without GPUs; default: all slots)")
    parser.add_argument("--master_addr", "--master-addr",
                        help="address of node 0 (required with --no-ssh across nodes; over ssh, default: the "
                             "hostfile's first host, resolved here)")
    parser.add_argument("--master_port", "--master-port", type=int, default=None,
                        help=f"node 0's rendezvous port (default: a free one on one node, {MULTI_NODE_PORT} "
                             "across nodes)")
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


def parse_subcommand(command: list[str], parse_args) -> argparse.Namespace:
    """Check the sub-command here, before any node starts; its argparse message becomes our error.
    `parse_args` is the CLI's own (handed down by the CLI, which sits above this layer)."""
    if not command:
        raise UserError("no sub-command to run: add it after '--', e.g. -- distill --config recipe.yaml")
    if command[0] in NOT_LAUNCHABLE:
        raise UserError(f"'{command[0]}' cannot run on the ranks; give a training sub-command such as distill")
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return parse_args(command)
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


def _check_arguments(args: argparse.Namespace, hosts: list[Host]) -> int:
    """Refuse inconsistent launch arguments before anything starts; returns the number of nodes."""
    num_nodes = args.num_nodes if args.num_nodes is not None else (len(hosts) or 1)
    if num_nodes < 1:
        raise UserError(f"--num_nodes must be >= 1, got {num_nodes}")
    if num_nodes > max(len(hosts), 1):
        where = f"the hostfile {args.hostfile} lists {len(hosts)}" if hosts else "give --hostfile to name them"
        raise UserError(f"--num_nodes {num_nodes}: {where}")
    if args.num_gpus is not None and args.num_gpus < 1:
        raise UserError(f"--num_gpus must be >= 1, got {args.num_gpus}")
    if args.master_port is not None and not 0 < args.master_port < 65536:
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
    return num_nodes


def master_address(args: argparse.Namespace, hosts: list[Host], num_nodes: int) -> str:
    """--master_addr, or on one node its own loopback, or across nodes the hostfile's first host as it
    resolves here (deepspeed's runner would take the first word of `hostname -I` over ssh: often a
    docker bridge or an address the other nodes cannot reach)."""
    if args.master_addr:
        return args.master_addr
    if num_nodes == 1:
        return "127.0.0.1"
    first = hosts[0].name
    try:
        addresses = [info[4][0] for info in socket.getaddrinfo(first, None, type=socket.SOCK_STREAM)]
    except (socket.gaierror, UnicodeError) as exc:
        raise UserError(f"--master_addr not given and the hostfile's first host {first!r} does not resolve here "
                        f"({exc}); give --master_addr (node 0's address)") from None
    address = next((a for a in addresses if ":" not in a), addresses[0])  # IPv4 first, as the runner's guess
    if ipaddress.ip_address(address.split("%")[0]).is_loopback:
        raise UserError(f"--master_addr not given and the hostfile's first host {first!r} resolves to {address}, "
                        "a loopback address, so the other nodes could not reach node 0 there; give --master_addr "
                        "(node 0's address on the network the nodes share)")
    return address


def port_taken(port: int) -> bool:
    """Whether something on this machine already listens on `port` (another job's rendezvous)."""
    for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            probe = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # no IPv6 on this machine
            continue
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's store: TIME_WAIT is no clash
            try:
                probe.bind((address, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
    return False


def master_port(args: argparse.Namespace, num_nodes: int) -> int:
    """--master_port, else a free port on one node (a second job on the machine must not meet the first
    one's rendezvous), else the fixed default every node assumes. On the node that hosts the rendezvous a
    port already in use is refused here, before the ranks would die on EADDRINUSE."""
    if args.master_port is None and num_nodes == 1:
        with socket.socket() as probe:
            probe.bind(("", 0))
            return probe.getsockname()[1]
    port = MULTI_NODE_PORT if args.master_port is None else args.master_port
    hosts_rendezvous = num_nodes == 1 or (args.no_ssh and args.node_rank == 0)
    if hosts_rendezvous and port_taken(port):
        fix = "leave --master_port out to get a free one" if num_nodes == 1 else "give every node another --master_port"
        raise UserError(f"--master_port {port} is already in use on this machine (another job?); {fix}")
    return port


def scheduler_gpus(environment: dict[str, str] | None = None) -> list[int] | None:
    """The GPU indices CUDA_VISIBLE_DEVICES leaves to this node's ranks (Slurm sets it for a job step with
    GPUs; a user may too); None when it is unset or empty."""
    value = (os.environ if environment is None else environment).get("CUDA_VISIBLE_DEVICES", "").strip()
    if not value:
        return None
    ids = [part.strip() for part in value.split(",")]
    if not all(part.isdigit() for part in ids):
        raise UserError(f"CUDA_VISIBLE_DEVICES={value}: deepspeed's launcher places ranks by GPU index, not by "
                        "UUID or MIG name; give indices (nvidia-smi -L lists them)")
    return [int(part) for part in ids]


def node_world(args: argparse.Namespace, hosts: list[Host], num_nodes: int, visible: list[int]) -> dict:
    """Ranks per node in deepspeed's world_info form, this node's entry being the scheduler's GPUs: the
    launcher of each node sets its ranks' CUDA_VISIBLE_DEVICES from its own entry and counts the others."""
    nodes = [(h.name, args.num_gpus or h.slots) for h in hosts[:num_nodes]]
    if not nodes:  # one node without a hostfile: deepspeed's own name for it
        nodes = [("localhost", args.num_gpus or len(visible))]
    me = args.node_rank or 0
    name, count = nodes[me]
    if count > len(visible):
        raise UserError(f"{count} ranks on {name} but CUDA_VISIBLE_DEVICES={','.join(map(str, visible))} shows "
                        f"{len(visible)} GPU(s); ask the scheduler for {count} GPUs or launch {len(visible)} ranks")
    return {host: (visible[:n] if i == me else list(range(n))) for i, (host, n) in enumerate(nodes)}


def plan_launch(args: argparse.Namespace, base_env: dict[str, str] | None = None) -> LaunchPlan:
    command = strip_separator(list(args.command))
    parse_subcommand(command, args.parse_args)
    hosts = read_hostfile(args.hostfile) if args.hostfile else []
    num_nodes = _check_arguments(args, hosts)
    uses_ssh = num_nodes > 1 and not args.no_ssh
    env = rank_environment(args.env, base_env, user_env_files() if uses_ssh else None)
    addr = master_address(args, hosts, num_nodes)
    if uses_ssh:
        check_ssh_safe(command, env, addr, base_env)
    port = master_port(args, num_nodes)
    visible = None if uses_ssh else scheduler_gpus(base_env)  # over ssh, this shell's GPUs say nothing of the others
    if visible is not None:
        # deepspeed's runner would give the ranks GPUs 0..N-1 whatever the scheduler bound (its hostfile and
        # --num_gpus paths overwrite CUDA_VISIBLE_DEVICES); its per-node launcher takes the world as given
        world = node_world(args, hosts, num_nodes, visible)
        encoded = base64.urlsafe_b64encode(json.dumps(world).encode()).decode()
        cmd = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={encoded}",
               f"--node_rank={args.node_rank or 0}", f"--master_addr={addr}", f"--master_port={port}",
               "--module", "ernie_tiny_ds.cli", *command]
        return LaunchPlan(cmd, env, uses_ssh, hosts[:num_nodes], world)
    cmd = deepspeed_runner()
    if args.hostfile:
        cmd += ["--hostfile", str(Path(args.hostfile).resolve()), "--num_nodes", str(num_nodes)]
    if args.num_gpus is not None:
        cmd += ["--num_gpus", str(args.num_gpus)]
    cmd += ["--master_addr", addr, "--master_port", str(port)]
    if args.no_ssh:
        cmd += ["--no_ssh", "--node_rank", str(args.node_rank)]
    cmd += ["--module", "ernie_tiny_ds.cli", *command]
    return LaunchPlan(cmd, env, uses_ssh, hosts[:num_nodes])


def describe(plan: LaunchPlan) -> str:
    how = ("written to a .deepspeed_env file that the runner exports to every node" if plan.uses_ssh
           else "set in the environment of this node's ranks")
    world = (f"# ranks per node; this node's GPUs are CUDA_VISIBLE_DEVICES's (world_info):\n{json.dumps(plan.world)}\n"
             if plan.world is not None else "")
    return (f"# environment of every rank ({how}):\n{env_file_text(plan.environment)}"
            f"{world}# command:\n{shlex.join(plan.command)}\n")


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

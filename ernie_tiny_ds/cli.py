"""`ernie-tiny-ds` entry point: one sub-command per job. It only parses and calls.

Multi-rank jobs run under a launcher, e.g.
    deepspeed --num_gpus 2 --module ernie_tiny_ds.cli distill --config R --stage general
Bad input exits with code 2 and one line naming the key, file or line.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from .errors import UserError
from .runtime import rank_registry
from .runtime.deepspeed_startup import restore_mlflow, skip_mlflow_in_deepspeed_import

# Every command is a module with add_arguments(parser) and run(args) -> int, imported only when that command
# is parsed: one command never pays for another's dependencies (training stack, ONNX, Hub client).
COMMANDS = (
    ("distill", ".workflows.distill", "run one distillation stage"),
    ("export", ".workflows.export", "ZeRO checkpoint -> Hugging Face folder"),
    ("preprocess", ".data.preprocess", "tokenize a corpus into memory-mapped token shards"),
    ("finetune-teacher", ".workflows.finetune", "finetune the teacher on the task"),
    ("pipeline", ".workflows.pipeline", "run the four stages in order (and teacher finetuning)"),
    ("evaluate", ".workflows.evaluate", "task metrics of an exported model"),
    ("predict", ".workflows.predict", "predictions on a task split as GLUE submission files"),
    ("augment", ".workflows.augment", "TinyBERT-style augmented copies of the task's train file (masked-LM words)"),
    ("onnx", ".workflows.onnx_export", "model.onnx of an exported model, checked and timed against PyTorch"),
    ("push", ".workflows.push", "upload an exported model folder to the Hugging Face Hub"),
    ("launch", ".launch.runner", "run a sub-command under the deepspeed runner (hostfile, multi-node)"),
    ("submit", ".launch.submit", "submit a sub-command as a cluster job (Slurm)"),
)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser for `argv`: every command is listed with its help line, and the one `argv` names gets its
    arguments. Only the global --local_rank (an integer) may come before the command, so the first word
    of `argv` that is a command's name is the command."""
    names = [name for name, _, _ in COMMANDS]
    chosen = next((word for word in argv if word in names), None)
    parser = argparse.ArgumentParser(prog="ernie-tiny-ds", description=__doc__.splitlines()[0])
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    # launch/submit check the sub-command they will start with this very parsing
    parser.set_defaults(parse_args=parse_args)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module, help_text in COMMANDS:
        p = sub.add_parser(name, help=help_text)
        if name == chosen:
            mod = importlib.import_module(module, __package__)
            mod.add_arguments(p)
            p.set_defaults(func=mod.run)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    return build_parser(argv).parse_args(argv)


def _shutdown() -> None:
    """Leave the process group in order: a barrier first, so no rank exits while another still talks."""
    rank_registry.stop_watch()  # from here on, ranks may leave at their own pace
    dist = sys.modules.get("torch.distributed")  # a command that never imported it has no process group
    if dist is not None and dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    skip_mlflow_in_deepspeed_import()  # before parsing: a command's module may import DeepSpeed
    try:
        return _run_command(argv)
    finally:
        restore_mlflow()


def _run_command(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        code = args.func(args)
    except UserError as exc:
        rank = os.environ.get("RANK")  # set by the launcher, or by init_distributed during the call
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        # other ranks may be blocked in a collective: do not wait
        rank_registry.report_and_exit(f"{prefix}error: {exc}", code=2)
    except KeyboardInterrupt:  # Ctrl-C: one line saying where the job resumes, exit code 130
        from .runtime.interrupt import exit_interrupted  # it reads checkpoints (torch): not for every command
        exit_interrupted(args)
    except RuntimeError as exc:
        # another rank failed first (its own message says why); this one only saw its connection drop
        from .data.corpus import describe_worker_failure  # the data stack (torch): not for every command
        line = rank_registry.describe_peer_loss(exc)
        if line is None:  # a DataLoader worker's death can surface anywhere in the main thread
            worker = describe_worker_failure(exc, os.environ.get("RANK"))
            line = f"error: {worker}" if worker else None
        if line is None:
            raise
        rank_registry.report_and_exit(line)
    _shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())

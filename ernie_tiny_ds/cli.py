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


def _recipe(args):
    from .config import load_recipe
    return load_recipe(args.config, args.overrides)


def cmd_distill(args) -> int:
    from .outputs import output_dir_job
    from .runtime.loop import run_stage
    recipe = _recipe(args)
    with output_dir_job(recipe):  # before the process group: a refused output_dir costs nothing
        run_stage(recipe, args.stage)
    return 0


def cmd_export(args) -> int:
    from pathlib import Path

    from .outputs import claim_output, exclusive
    from .runtime.export import EXPORT, export_checkpoint
    if args.onnx:  # before the export, not after it: a missing extra is one line and writes nothing
        from .workflows.onnx_export import require_onnx
        require_onnx()
    output = claim_output(args.output, EXPORT, "--output", {"--checkpoint": args.checkpoint}, args.overwrite)
    with exclusive(output.parent, output.name, "--output"):
        out = export_checkpoint(args.checkpoint, output)
    print(f"exported student to {out}")
    if args.onnx:
        from .workflows.onnx_export import ONNX_FILE, export_onnx, written_line
        print(written_line(export_onnx(out, Path(out) / ONNX_FILE)), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .config import STAGES

    parser = argparse.ArgumentParser(prog="ernie-tiny-ds", description=__doc__.splitlines()[0])
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    # launch/submit check the sub-command they will start with this very parser
    parser.set_defaults(build_parser=build_parser)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_recipe(p):
        p.add_argument("--config", required=True, help="YAML recipe")
        p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")
        return p

    p = with_recipe(sub.add_parser("distill", help="run one distillation stage"))
    p.add_argument("--stage", default="general", choices=STAGES)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("export", help="ZeRO checkpoint -> Hugging Face folder")
    p.add_argument("--checkpoint", required=True, help="a checkpoint folder, or the folder holding `latest`")
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output when it is an earlier export (nothing else is ever replaced)")
    p.add_argument("--onnx", action="store_true",
                   help="also write OUTPUT/model.onnx, checked against PyTorch (needs the onnx extra)")
    p.set_defaults(func=cmd_export)

    # Commands whose module declares its own arguments: add_arguments(parser) and run(args) -> int.
    for name, module, help_text in COMMAND_MODULES:
        mod = importlib.import_module(module, __package__)
        p = sub.add_parser(name, help=help_text)
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
    return parser


COMMAND_MODULES = (
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


def _shutdown() -> None:
    """Leave the process group in order: a barrier first, so no rank exits while another still talks."""
    import torch.distributed as dist

    from .runtime.rank_registry import stop_watch
    stop_watch()  # from here on, ranks may leave at their own pace
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        code = args.func(args)
    except UserError as exc:
        rank = os.environ.get("RANK")  # set by the launcher, or by init_distributed during the call
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        from .runtime.rank_registry import report_and_exit
        report_and_exit(f"{prefix}error: {exc}", code=2)  # other ranks may be blocked in a collective: do not wait
    except KeyboardInterrupt:  # Ctrl-C: one line saying where the job resumes, exit code 130
        from .runtime.interrupt import exit_interrupted
        exit_interrupted(args)
    except RuntimeError as exc:
        # another rank failed first (its own message says why); this one only saw its connection drop
        from .data.corpus import describe_worker_failure
        from .runtime.rank_registry import describe_peer_loss, report_and_exit
        line = describe_peer_loss(exc)
        if line is None:  # a DataLoader worker's death can surface anywhere in the main thread
            worker = describe_worker_failure(exc, os.environ.get("RANK"))
            line = f"error: {worker}" if worker else None
        if line is None:
            raise
        report_and_exit(line)
    _shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())

"""`ernie-tiny-ds export`: the student of a ZeRO checkpoint as a Hugging Face folder (runtime/export.py),
and with --onnx its model.onnx beside it."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..outputs import claim_output, exclusive
from ..runtime.export import EXPORT, export_checkpoint
from .onnx_export import ONNX_FILE, export_onnx, require_onnx, written_line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder, or the folder holding `latest`")
    parser.add_argument("--output", required=True)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace --output when it is an earlier export (nothing else is ever replaced)")
    parser.add_argument("--onnx", action="store_true",
                        help="also write OUTPUT/model.onnx, checked against PyTorch (needs the onnx extra)")


def run(args) -> int:
    if args.onnx:  # before the export, not after it: a missing extra is one line and writes nothing
        require_onnx()
    output = claim_output(args.output, EXPORT, "--output", {"--checkpoint": args.checkpoint}, args.overwrite)
    with exclusive(output.parent, output.name, "--output"):
        out = export_checkpoint(args.checkpoint, output)
    print(f"exported student to {out}")
    if args.onnx:
        print(written_line(export_onnx(out, Path(out) / ONNX_FILE)), flush=True)
    return 0

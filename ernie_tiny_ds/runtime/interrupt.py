"""The one line a Ctrl-C (SIGINT) ends a command with: where the job can pick up again.

A checkpoint is written under a temporary name and only named in `latest` once complete (see
runtime/checkpoint.py), so an interrupt at any moment, a save included, leaves the newest named
checkpoint intact: the traceback of the KeyboardInterrupt tells the user nothing they need.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..config import load_recipe
from . import rank_registry
from .checkpoint import LATEST

EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for a command ended by Ctrl-C
CHECKPOINTING = ("distill", "pipeline", "finetune-teacher")


def _checkpoint_roots(args) -> list[Path]:
    """Where this command keeps checkpoints: OUT/<stage>/checkpoints, finetuning's OUTPUT.checkpoints."""
    out = Path(load_recipe(args.config, args.overrides).output_dir)
    roots = [*out.glob(f"*/checkpoints/{LATEST}"), *out.glob(f"*.checkpoints/{LATEST}")]
    if getattr(args, "output", None):
        output = Path(args.output)
        roots.append(output.with_name(output.name + ".checkpoints") / LATEST)
    return [latest.parent for latest in roots if latest.is_file()]


def interrupted_line(args) -> str:
    if getattr(args, "command", None) not in CHECKPOINTING:
        return "interrupted (Ctrl-C)"
    try:
        roots = _checkpoint_roots(args)
    except Exception:  # the recipe loaded once already; whatever fails now must not hide the interrupt
        roots = []
    if not roots:
        return "interrupted (Ctrl-C) before the first checkpoint: running the same command again starts over"
    newest = max(roots, key=lambda root: (root / LATEST).stat().st_mtime)
    tag = (newest / LATEST).read_text().strip()
    return (f"interrupted (Ctrl-C); the newest checkpoint is {newest / tag}: running the same command again "
            f"resumes from it")


def exit_interrupted(args) -> None:
    """Rank 0 (or a run without a launcher) prints the line; every rank ends at once with EXIT_CODE."""
    if os.environ.get("RANK") in (None, "0"):
        rank_registry.report_and_exit(interrupted_line(args), code=EXIT_CODE)
    os._exit(EXIT_CODE)

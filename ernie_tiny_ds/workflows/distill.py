"""`ernie-tiny-ds distill`: one distillation stage of a recipe (`pipeline` runs them all in order)."""
from __future__ import annotations

import argparse

from ..config import STAGES, load_recipe
from ..data.tasks import resolve_task
from ..outputs import output_dir_job
from ..runtime.loop import run_stage
from ..runtime.shared_teacher import run_shared_stage
from ..stages import STAGE_SPECS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML recipe")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="recipe overrides")
    parser.add_argument("--stage", default="general", choices=STAGES)


def run(args) -> int:
    recipe = load_recipe(args.config, args.overrides)
    if STAGE_SPECS[args.stage].data == "task":  # one line now, not after the teacher and student have loaded
        resolve_task(recipe.task)
    with output_dir_job(recipe):  # before the process group: a refused output_dir costs nothing
        if recipe.students:  # several students: one teacher pass per batch trains them all (OUT/<name>/<stage>)
            run_shared_stage(recipe, args.stage)
        else:
            run_stage(recipe, args.stage)
    return 0

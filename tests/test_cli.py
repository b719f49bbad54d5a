"""The CLI's parsing: every command listed with its help line, and only the command being run imported."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from distributed import REPO, env

from ernie_tiny_ds import cli

# each command's own module, and what those modules alone bring in
COMMAND_MODULES = {name: "ernie_tiny_ds" + module for name, module, _ in cli.COMMANDS}

DISTILL_WITH_A_MISSING_RECIPE = """
import json, sys
from ernie_tiny_ds.runtime import rank_registry
def one_line(line, code=1):  # the one-line exit (os._exit in production), so that this process can report
    print(line, file=sys.stderr, flush=True)
    raise SystemExit(code)
rank_registry.report_and_exit = one_line
from ernie_tiny_ds.cli import main
try:
    main(["distill", "--config", "/nonexistent/recipe.yaml"])
except SystemExit as exc:
    print(json.dumps({"code": exc.code, "modules": sorted(sys.modules)}))
"""


@pytest.mark.slow  # a fresh interpreter: a process start-up, outside the quick tier
def test_a_command_imports_no_other_command_s_module():
    """`distill` with a missing recipe: one line, exit 2, and none of the other commands' modules (the ONNX,
    Hub, finetuning, evaluation, launcher stacks) was imported to get there."""
    proc = subprocess.run([sys.executable, "-c", DISTILL_WITH_A_MISSING_RECIPE], env=env(), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 2
    assert proc.stderr.strip().splitlines() == [line for line in proc.stderr.strip().splitlines()
                                                if "/nonexistent/recipe.yaml" in line]
    others = {name: module for name, module in COMMAND_MODULES.items() if name != "distill"}
    assert COMMAND_MODULES["distill"] in result["modules"]
    assert [name for name, module in others.items() if module in result["modules"]] == []
    assert "deepspeed" not in result["modules"]  # imported where a group or an engine is made, never to parse


# launch and submit parse the command they start (cli.parse_args) in a process that trains nothing
TRAINING_COMMANDS_PARSED = """
import json, sys
from ernie_tiny_ds import cli
for argv in (["distill", "--config", "r.yaml"], ["finetune-teacher", "--config", "r.yaml"],
             ["pipeline", "--config", "r.yaml"], ["export", "--checkpoint", "c", "--output", "o"]):
    cli.parse_args(argv)
print(json.dumps(sorted(name for name in sys.modules if name.split(".")[0] == "deepspeed")))
"""


@pytest.mark.slow  # a fresh interpreter: a process start-up, outside the quick tier
def test_parsing_a_training_command_imports_no_deepspeed():
    """The training commands' modules import the training stack at their top, but not DeepSpeed: its import
    picks an accelerator and logs, which `launch` must not do while it checks the command's arguments."""
    proc = subprocess.run([sys.executable, "-c", TRAINING_COMMANDS_PARSED], env=env(), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_help_lists_every_command_with_its_help_line(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--help"])
    assert stop.value.code == 0
    words = " ".join(capsys.readouterr().out.split())  # argparse wraps long help lines
    for name, _, help_text in cli.COMMANDS:
        assert f" {name} {help_text} " in words, (name, words)


@pytest.mark.parametrize("argv", [["distill", "--help"], ["--local_rank=0", "export", "--help"],
                                  ["--local_rank", "1", "pipeline", "-h"]])
def test_a_command_s_help_shows_its_own_arguments(capsys, argv):
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    assert stop.value.code == 0
    shown = capsys.readouterr().out
    expected = {"distill": "--stage", "export": "--checkpoint", "pipeline": "--from-stage"}
    command = next(word for word in argv if word in expected)
    assert shown.startswith(f"usage: ernie-tiny-ds {command}") and expected[command] in shown


def test_a_command_s_bad_argument_is_argparse_s_one_error(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["distill", "--config", "r.yaml", "--stage", "nonsense"])
    assert stop.value.code == 2
    assert "argument --stage: invalid choice: 'nonsense'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        cli.main(["no-such-command"])
    assert stop.value.code == 2
    assert "invalid choice: 'no-such-command'" in capsys.readouterr().err

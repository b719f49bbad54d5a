"""DeepSpeed's import without mlflow's: a second less per rank and per command where mlflow is installed.

`import deepspeed` imports its autotuner, whose module runs `import mlflow` (inside try/except) for
the autotuning runs this tool never starts; where mlflow is installed (the `trackers` extra) that
is 1.0 s of DeepSpeed's 2.9 s import on the 2-core VM (`python -X importtime -c "import deepspeed"`),
paid by every rank and every command. While a command runs, a None entry in sys.modules makes that
import fail at once (None there is how Python spells "not installed"), so DeepSpeed records
has_mlflow = False and nothing else changes. The mlflow tracker, the one code here that needs the
package, takes the entry out before importing it; the command's end takes it out in any case.

Nothing here imports anything heavy: the CLI calls it before parsing.
"""
from __future__ import annotations

import sys

_HIDDEN = "mlflow"


def skip_mlflow_in_deepspeed_import() -> None:
    """Hide mlflow until restore_mlflow(), unless DeepSpeed or mlflow is already imported (then it changes
    nothing, so a command run inside a process that has both keeps them)."""
    if "deepspeed" not in sys.modules and _HIDDEN not in sys.modules:
        sys.modules[_HIDDEN] = None


def restore_mlflow() -> None:
    """`import mlflow` finds the installed package again (a no-op where it was not hidden)."""
    if _HIDDEN in sys.modules and sys.modules[_HIDDEN] is None:
        del sys.modules[_HIDDEN]

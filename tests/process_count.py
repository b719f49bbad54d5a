"""pytest plugin: counts the processes the tests start, by kind, and prints the counts after the run.

Process start-ups (each importing torch, deepspeed and transformers) are most of the suite's time, so
the summary names the tests that start the most of them: the ones to fold into shared runs first.
"""
from __future__ import annotations

import collections
import multiprocessing.util
import os
import shutil
import subprocess

import pytest

LAUNCHERS = {"deepspeed", "torchrun", "accelerate", "srun", "sbatch", "salloc"}
# what costs seconds to start (an interpreter); `ps`, `git` and the like are counted apart
HEAVY = ("launcher", "cli", "python", "bash")

_by_kind: collections.Counter = collections.Counter()
_by_test: collections.Counter = collections.Counter()
_current_test = [None]
_current_is_slow = [False]
# tests outside the slow tier that start processes or run long: the quick tier (-m "not slow") must stay quick
QUICK_LIMIT_S = 3.0
_unmarked: dict = {}
_real_popen_init = subprocess.Popen.__init__
_real_spawnv_passfds = multiprocessing.util.spawnv_passfds


def kind_of(argv) -> str:
    """launcher (a command that starts ranks), cli (`python -m ernie_tiny_ds.cli`), python (any other
    interpreter), or the program's own name (bash, ps, ...)."""
    words = [str(a) for a in argv] if isinstance(argv, (list, tuple)) else str(argv).split()
    if not words:
        return "other"
    program = os.path.basename(words[0])
    module = words[words.index("-m") + 1] if "-m" in words[:-1] else ""
    if program in LAUNCHERS or module in ("torch.distributed.run", "deepspeed.launcher.runner"):
        return "script" if _is_script(words[0]) else "launcher"  # a test's stand-in sbatch is a shell script
    if module == "ernie_tiny_ds.cli":
        # `cli launch` and `cli submit` start ranks (or a job) themselves
        return "launcher" if len(words) > words.index("-m") + 2 and words[words.index("-m") + 2] in (
            "launch", "submit") else "cli"
    if program.startswith("python"):
        return "python"
    return program


def _is_script(program: str) -> bool:
    """A shell script (a test's stand-in), not an interpreter's entry point like the venv's `deepspeed`."""
    try:
        with open(shutil.which(program) or program, "rb") as f:
            first = f.readline()
    except OSError:
        return False
    return first.startswith(b"#!") and b"python" not in first


def _counting_init(self, args, *rest, **kwargs):
    _count(kind_of(args))
    return _real_popen_init(self, args, *rest, **kwargs)


def _counting_spawn(path, args, passfds):
    # multiprocessing's "spawn" start method starts a fresh interpreter without subprocess.Popen; its
    # resource tracker is a small helper that imports nothing heavy
    _count("mp-helper" if any("resource_tracker" in str(a) for a in args) else "python")
    return _real_spawnv_passfds(path, args, passfds)


def _count(kind: str) -> None:
    if _current_test[0] is None:  # no test yet: pytest-xdist starting its workers (the controller's count)
        _by_kind["pytest-worker"] += 1
        return
    _by_kind[kind] += 1
    if kind in HEAVY:
        _by_test[_current_test[0]] += 1
        if not _current_is_slow[0] and kind != "bash":  # a shell script alone starts in milliseconds
            _unmarked[_current_test[0]] = "starts processes"


def pytest_configure(config):
    subprocess.Popen.__init__ = _counting_init
    multiprocessing.util.spawnv_passfds = _counting_spawn


def pytest_unconfigure(config):
    subprocess.Popen.__init__ = _real_popen_init
    multiprocessing.util.spawnv_passfds = _real_spawnv_passfds


def pytest_runtest_setup(item):
    # fixtures that start processes run in setup: they count for the first test that needs them
    _current_test[0] = item.nodeid
    _current_is_slow[0] = item.get_closest_marker("slow") is not None


def pytest_runtest_logreport(report):
    if report.when == "call" and report.duration > QUICK_LIMIT_S and "slow" not in report.keywords:
        _unmarked.setdefault(report.nodeid, f"took {report.duration:.0f} s")


def pytest_sessionfinish(session):
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # a pytest-xdist worker: the controller adds up every worker's counts
        workeroutput["process_count"] = {"by_kind": dict(_by_kind), "by_test": dict(_by_test),
                                         "unmarked": dict(_unmarked)}


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: absent from a run without workers
def pytest_testnodedown(node, error):
    counts = getattr(node, "workeroutput", {}).get("process_count")
    if counts:
        _by_kind.update(counts["by_kind"])
        _by_test.update(counts["by_test"])
        _unmarked.update(counts["unmarked"])


def pytest_terminal_summary(terminalreporter):
    heavy = {k: n for k, n in _by_kind.items() if k in HEAVY}
    rest = {k: n for k, n in _by_kind.items() if k not in heavy}
    terminalreporter.write_sep("=", f"process start-ups: {sum(heavy.values())} "
                                    f"({', '.join(f'{k} {n}' for k, n in sorted(heavy.items()))}); "
                                    f"other programs {sum(rest.values())}")
    for nodeid, n in _by_test.most_common(25):
        terminalreporter.write_line(f"{n:4d}  {nodeid}")
    if _unmarked:
        terminalreporter.write_sep("=", f"not marked slow but {len(_unmarked)} tests start processes or take "
                                        f"> {QUICK_LIMIT_S:.0f} s (mark them @pytest.mark.slow)")
        for nodeid, why in _unmarked.items():
            terminalreporter.write_line(f"{why:>17}  {nodeid}")
